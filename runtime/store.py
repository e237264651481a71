"""The enrollment store: support embeddings per class and the fitted head, on disk.

A folder holding `enrollment.npz` (no pickles) and, when asked, the enrolled images under
`images/` (content-addressed) so a store can be re-embedded for a new bundle. Every save writes a
temp file, fsyncs it and renames it over the old one, so a crash or `kill -9` at any moment leaves
the previous state loadable. Writers from several processes serialise on an advisory lock file.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ConfigError, StorageError, StoreError
from .files import atomic_write
from .heads import HeadConfig, NewerHeadError

# One set of bounds for enrollment, stores and galleries: whatever can be saved can be restored.
MAX_CLASSES = 100_000
MAX_SHOTS = 10_000          # support embeddings per class
# An embedding is the output of a network on 0–255 pixels; no model edgemeta exports comes within
# orders of magnitude of this (the shipped ones stay under 100). Larger values are forged or broken,
# and would overflow float32 class means and distances (3e38; 1e19 squared is already inf).
MAX_EMBEDDING_ABS = 1e6

MAX_NEGATIVES = 10_000      # negative examples (corrections "this is not …") per store
MAX_NOTE_LENGTH = 128

STORE_FORMAT = "edgemeta-store"
STORE_VERSION = 2           # 2: negative examples, per-class limits; a store without either is written as version 1
MAX_LIMIT = 1e6
STATE_FILE = "enrollment.npz"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 60.0  # how long a writer waits for another process's lock before it gives up
IMAGES_DIR = "images"
# Names the store gives kept images: the first 32 hex digits of the file's sha256, then its suffix.
KEPT_NAME = re.compile(r"([0-9a-f]{32})(\.[a-z0-9]{1,10})$")
# Temp files of an interrupted atomic save (runtime.files.atomic_write) of the state file
# and of a kept image.
TEMP_NAMES = {"": re.compile(r"\.enrollment\.npz\.[A-Za-z0-9_]+\.tmp"),
              IMAGES_DIR: re.compile(r"\.[0-9a-f]{32}\.[a-z0-9]{1,10}\.[A-Za-z0-9_]+\.tmp")}


@dataclass(frozen=True)
class EnrolledClass:
    label: str
    embeddings: np.ndarray              # float32 [shots, D], read-only
    images: tuple[str, ...] = ()        # kept image file names under images/, if any
    limit: float | None = None          # the person's own "unknown" distance limit for this class (None: auto's)

    @property
    def shots(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class Negative:
    """A correction "this is not any of them" (or "not X", `note`): an image's embedding that a query
    must not be nearer to than to its nearest class, or it answers "unknown"."""

    embedding: np.ndarray               # float32 [D], read-only
    image: str = ""                     # kept image file name under images/, if kept
    note: str = ""                      # the label it was wrongly given, if any

    @functools.cached_property
    def id(self) -> str:
        return negative_id(self.embedding)


def with_negatives(current, incoming) -> tuple[Negative, ...]:
    """`current` and then every incoming negative not already among them (by id)."""
    have = {n.id for n in current}
    out = list(current)
    for n in incoming:
        if n.id not in have:
            have.add(n.id)
            out.append(n)
    return tuple(out)


def negative_id(embedding: np.ndarray) -> str:
    """A negative's stable name: the first 12 hex digits of its embedding's sha256."""
    return hashlib.sha256(np.ascontiguousarray(embedding, np.float32).tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class StoreState:
    """An immutable snapshot: what is enrolled and for which model."""

    model_sha256: str
    variant: str
    embedding_dim: int
    head: HeadConfig
    classes: tuple[EnrolledClass, ...] = ()
    fitted: dict = field(default_factory=dict)  # name -> array, the fitted head
    generation: int = 0
    negatives: tuple[Negative, ...] = ()

    @functools.cached_property
    def negative_matrix(self) -> np.ndarray | None:
        """The negatives' embeddings as one [n, D] array (None without negatives)."""
        return frozen(np.stack([n.embedding for n in self.negatives])) if self.negatives else None

    @functools.cached_property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.classes)  # once per snapshot: every prediction names them

    def find(self, label: str) -> int | None:
        for i, c in enumerate(self.classes):
            if c.label == label:
                return i
        return None


def check_embeddings(embeddings: np.ndarray, where: str) -> None:
    """Finite and within ±MAX_EMBEDDING_ABS, or StoreError naming where."""
    if embeddings.size and not np.isfinite(embeddings).all():
        raise StoreError(f"{where} holds non-finite embeddings (NaN or inf)")
    if embeddings.size and float(np.abs(embeddings).max()) > MAX_EMBEDDING_ABS:
        raise StoreError(f"{where} holds embedding values up to {float(np.abs(embeddings).max()):.3g}, beyond what a model "
                         f"produces (limit ±{MAX_EMBEDDING_ABS:g}); it was forged or made by a broken model")


def check_counts(classes: int, shots: dict[str, int], where: str) -> None:
    """Class and shot counts within MAX_CLASSES / MAX_SHOTS, or StoreError."""
    if classes > MAX_CLASSES:
        raise StoreError(f"{where}: {classes:,} classes is over the limit of {MAX_CLASSES:,}")
    over = [(label, n) for label, n in shots.items() if n > MAX_SHOTS]
    if over:
        raise StoreError(f"{where}: class {over[0][0]!r} would have {over[0][1]:,} shots; the limit is {MAX_SHOTS:,} per class")


def frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def encode_state(state: StoreState) -> bytes:
    header = {"format": STORE_FORMAT, "version": STORE_VERSION if needs_version_2(state.classes, state.negatives) else 1,
              "model_sha256": state.model_sha256,
              "variant": state.variant, "embedding_dim": state.embedding_dim, "head": state.head.to_dict(),
              "generation": state.generation,
              "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "classes": [class_entry(c, c.images) for c in state.classes],
              "fitted": sorted(state.fitted)}
    if state.negatives:
        header["negatives"] = [{"image": n.image, "note": n.note} for n in state.negatives]
    arrays = {"header": np.array(json.dumps(header)),
              "embeddings": (np.concatenate([c.embeddings for c in state.classes]) if state.classes
                             else np.zeros((0, state.embedding_dim), np.float32))}
    arrays.update({f"fitted_{k}": v for k, v in state.fitted.items()})
    if state.negative_matrix is not None:
        arrays["negatives"] = state.negative_matrix
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as its allow_pickle flag
    return buf.getvalue()


def needs_version_2(classes, negatives) -> bool:
    """Negatives or a per-class limit: what a version-1 reader would drop on its next save."""
    return bool(negatives) or any(c.limit is not None for c in classes)


def class_entry(c: EnrolledClass, images) -> dict:
    """A class's header entry in a store or gallery."""
    entry = {"label": c.label, "shots": c.shots, "images": list(images)}
    if c.limit is not None:
        entry["limit"] = c.limit
    return entry


def check_limit(value, where: str) -> float | None:
    """A per-class limit as saved: absent, or a finite distance from 0 to MAX_LIMIT."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_LIMIT:
        raise StoreError(f"{where}: a class's unknown limit must be a distance from 0 to {MAX_LIMIT:g}, got {value!r}")
    return float(value)


def check_format(header, fmt: str, version: int, what: str, where: str) -> None:
    """A file's JSON header names our format, at a version this edgemeta reads."""
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise StoreError(f"{where} is not an edgemeta {what}")
    if not isinstance(header.get("version", 0), int) or header.get("version", 0) > version:
        raise StoreError(f"{where} was written by a newer edgemeta ({what} version {header.get('version')}); upgrade edgemeta")


def decode_state(data: bytes, where: str) -> StoreState:
    if not data.startswith(b"PK"):
        raise StoreError(f"{where} is not an enrollment store (not an .npz file edgemeta wrote); "
                         "restore it from a backup or enroll again into a new store")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            embeddings = z["embeddings"].astype(np.float32)
            fitted = {k: frozen(z[f"fitted_{k}"]) for k in header.get("fitted", [])}
            negative_rows = z["negatives"].astype(np.float32) if "negatives" in z.files else None
    except Exception as exc:
        raise StoreError(f"{where} is not a readable enrollment store ({exc})") from None
    check_format(header, STORE_FORMAT, STORE_VERSION, "enrollment store", where)
    try:
        head = HeadConfig.from_dict(header["head"], where)
        classes, start = [], 0
        for c in header["classes"]:
            shots = c["shots"]
            if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1 or start + shots > len(embeddings):
                raise StoreError(f"{where}: class {c['label']!r} claims {shots!r} shots the file does not hold")
            names = tuple(c.get("images", []))
            if not all(isinstance(n, str) and KEPT_NAME.fullmatch(n) for n in names):
                raise StoreError(f"{where}: class {c['label']!r} names kept images the store did not write")
            classes.append(EnrolledClass(str(c["label"]), frozen(embeddings[start:start + shots]), names,
                                         check_limit(c.get("limit"), where)))
            start += shots
        dim = header["embedding_dim"]
        if start != len(embeddings) or (len(embeddings) and embeddings.shape[1] != dim):
            raise StoreError(f"{where}: the embeddings do not match the class list ({len(embeddings)} rows)")
        check_counts(len(classes), {c.label: c.shots for c in classes}, where)
        classes = migrate_labels(classes)
        negatives = decode_negatives(header.get("negatives", []), negative_rows, int(dim), where)
        state = StoreState(str(header["model_sha256"]), str(header.get("variant", "fp32")), int(dim), head,
                           tuple(classes), fitted, int(header.get("generation", 0)), negatives)
        from .heads import fitted_shapes
        expected = fitted_shapes(head, len(classes), int(dim)) if classes else {}
        if {k: tuple(v.shape) for k, v in fitted.items()} != expected:
            raise StoreError(f"{where}: the saved head does not fit its {len(classes)} classes of dim {dim} "
                             f"({ {k: list(v.shape) for k, v in fitted.items()} }); the file is damaged or was edited")
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        if isinstance(exc, StoreError):
            raise
        if isinstance(exc, NewerHeadError):  # not damage: a newer edgemeta's store
            raise StoreError(f"{exc}; the store was not changed") from None
        raise StoreError(f"{where} is damaged ({exc}); restore it from a backup or enroll again into a new store") from None
    poisoned = [c.label for c in classes if not np.isfinite(c.embeddings).all()]
    if poisoned or not all(np.isfinite(a).all() for a in fitted.values() if a.dtype.kind == "f"):
        raise StoreError(f"{where} holds non-finite embeddings (class {', '.join(map(repr, poisoned)) or 'head'}); "
                         "enroll the classes again into a new store")
    check_embeddings(embeddings, where)
    return state


def migrate_labels(classes: list[EnrolledClass]) -> list[EnrolledClass]:
    """Labels an older edgemeta accepted, in today's form (runtime.labels.migrate_label), unless two
    would then collide (those keep their exact old text, still addressable)."""
    from .labels import migrate_label
    new = [migrate_label(c.label) for c in classes]
    taken = [c.label for c in classes]
    out = []
    for c, label in zip(classes, new):
        clash = label != c.label and (new.count(label) > 1 or label in taken)
        out.append(c if label == c.label or clash else replace(c, label=label))
    return out


def decode_negatives(entries, rows: np.ndarray | None, dim: int, where: str) -> tuple[Negative, ...]:
    """The negatives a file declares, checked against the rows it holds (count, dimension, names)."""
    if not isinstance(entries, list) or len(entries) > MAX_NEGATIVES:
        raise StoreError(f"{where}: the negatives are not a list of at most {MAX_NEGATIVES:,}")
    if not entries:
        return ()
    if rows is None or rows.ndim != 2 or rows.shape != (len(entries), dim):
        raise StoreError(f"{where}: {len(entries)} negatives declared, the file holds "
                         f"{None if rows is None else list(rows.shape)} (dim {dim} expected)")
    check_embeddings(rows, f"{where} (negatives)")
    out = []
    for entry, row in zip(entries, rows):
        image, note = (entry.get("image", ""), entry.get("note", "")) if isinstance(entry, dict) else (None, None)
        if not isinstance(image, str) or (image and not KEPT_NAME.fullmatch(image)):
            raise StoreError(f"{where}: a negative names a kept image the store did not write")
        if not isinstance(note, str) or len(note) > MAX_NOTE_LENGTH:
            raise StoreError(f"{where}: a negative's note is not text of at most {MAX_NOTE_LENGTH} characters")
        out.append(Negative(frozen(row.copy()), image, note))
    return tuple(out)


class EnrollmentStore:
    """A store folder. `read()` returns the last complete state; `write()` replaces it atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._seen: tuple | None = None  # stat of the state file at our last read or write
        self._recorded: set[str] = set()  # kept-image names the last state we read or wrote refers to
        self._created: set[str] = set()   # kept images this object wrote that no saved state refers to yet

    def _stamp(self) -> tuple | None:
        try:
            st = self.state_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)  # every save renames a new file into place

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def exists(self) -> bool:
        return self.state_file.is_file()

    def read(self) -> StoreState | None:
        if not self.exists():
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} is a file, not a store folder")
            if self.state_file.exists() or self.state_file.is_symlink():
                raise StoreError(f"{self.state_file} is not a regular file; a store's state is a file edgemeta writes")
            return None
        stamp = self._stamp()
        state = decode_state(self.state_file.read_bytes(), str(self.state_file))
        self._seen = stamp
        self._recorded = _image_names(state)
        return state

    def read_if_changed(self) -> StoreState | None:
        """The saved state if another writer replaced it since our last read or write, else None
        (a stat instead of decoding the whole store on every enroll)."""
        stamp = self._stamp()
        return None if stamp is None or stamp == self._seen else self.read()

    def write(self, state: StoreState) -> None:
        for c in state.classes:
            check_embeddings(c.embeddings, f"class {c.label!r}")
        check_counts(len(state.classes), {c.label: c.shots for c in state.classes}, f"the store at {self.path}")
        if len(state.negatives) > MAX_NEGATIVES:
            raise StoreError(f"the store at {self.path} would hold {len(state.negatives):,} negatives; the limit is "
                             f"{MAX_NEGATIVES:,} (remove some with `edgemeta negatives --remove`)")
        if not all(np.isfinite(a).all() for a in state.fitted.values()):
            raise StoreError("refusing to save a head fitted to non-finite values; nothing was changed")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_file, encode_state(state))
        except OSError as exc:
            self._remove_released_images(self._created - self._recorded)  # this change's kept images
            self._created = set()
            raise StorageError(f"cannot save the store at {self.path}: {exc.strerror or exc}; nothing was changed") from None
        self._seen = self._stamp()
        previous, self._recorded = self._recorded | self._created, _image_names(state)
        self._created = set()
        self._remove_released_images(previous - self._recorded)

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None):
        """Exclusive advisory lock across processes for a read-modify-write. When another process
        holds it, say so on stderr (with its pid) and wait up to `timeout` seconds (LOCK_TIMEOUT_S),
        then give up with StoreError: a stuck writer never hangs a command silently. The lock file
        is opened without following a link and only if it is a plain file of its own (one link):
        a store folder received from elsewhere cannot make edgemeta write a pid into another file."""
        f = self._open_lock()
        with f:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX
                fcntl = None  # type: ignore[assignment]
            if fcntl is not None:
                self._acquire(f, fcntl, LOCK_TIMEOUT_S if timeout is None else timeout)
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
            self._remove_stale_temp_files()  # every writer holds the lock while its temp file exists
            yield

    def _open_lock(self):
        import errno
        lock = self.path / LOCK_FILE
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{lock} is a link; a store's lock is a plain file edgemeta makes — remove the link") from None
            raise StorageError(f"cannot lock the store at {self.path}: {exc.strerror or exc}; nothing was changed") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise StoreError(f"{lock} is not a plain file of the store's own (a device or a hard link to another file); "
                             "remove it")
        return os.fdopen(fd, "r+")

    def _acquire(self, f, fcntl, timeout: float) -> None:
        import sys
        import time
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        f.seek(0)
        holder = f.read(32).strip() or "another process"
        sys.stderr.write(f"edgemeta: the store at {self.path} is locked by pid {holder}; waiting up to {timeout:g} s\n")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreError(f"the store at {self.path} stayed locked by pid {holder} for {timeout:g} s; "
                                     "is another edgemeta stuck? nothing was changed") from None
                time.sleep(0.05)

    def tidy(self) -> None:
        """At open: remove the temp files an interrupted save left, under the lock (a writer in
        another process holds it while its temp file exists). A store that cannot be locked — a
        read-only folder — is left as it is; nothing is created."""
        if self._own_folder("") is None or not (self.path / STATE_FILE).exists():
            return
        try:
            with self.locked():
                pass
        except (OSError, StorageError):
            pass

    def keep_image(self, data: bytes, suffix: str) -> str:
        """Store an image's bytes under images/ (content-addressed, durable); returns its file name."""
        folder = self.path / IMAGES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        if self._own_folder(IMAGES_DIR) is None:
            raise StoreError(f"{folder} is a link to another folder; a store keeps images only in its own images/ folder")
        suffix = suffix.lower() if suffix and KEPT_NAME.fullmatch("0" * 32 + suffix.lower()) else ".img"
        name = hashlib.sha256(data).hexdigest()[:32] + suffix
        if not (folder / name).exists():
            try:
                atomic_write(folder / name, data)
            except OSError as exc:
                self._remove_released_images(self._created)  # this change's kept images: nothing refers to them
                self._created = set()
                raise StorageError(f"cannot keep an enrolled image in {folder}: {exc.strerror or exc}; nothing was changed") from None
            self._created.add(name)
        return name

    def image_path(self, name: str) -> Path:
        return self.path / IMAGES_DIR / name

    def _own_folder(self, name: str) -> Path | None:
        """A folder of the store, if it is a real folder (never a link to somewhere else)."""
        folder = self.path / name if name else self.path
        try:
            return folder if stat.S_ISDIR(os.lstat(folder).st_mode) else None
        except OSError:
            return None

    def _remove_released_images(self, names: set[str]) -> None:
        """Delete kept images no class refers to any more — only files this store wrote: a name it
        generates whose content still hashes to that name, a regular file (not a link) in the
        store's own images/ folder (not a link). Anything else is left alone."""
        if not names:  # the usual save: nothing released, no file-system calls
            return
        folder = self._own_folder(IMAGES_DIR) if self._own_folder("") is not None else None
        if folder is None:
            return
        for name in names:
            match = KEPT_NAME.fullmatch(name)
            path = folder / name
            try:
                if not match or not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as f:
                    if hashlib.sha256(f.read()).hexdigest()[:32] != match.group(1):
                        continue
                path.unlink()
            except OSError:
                continue  # already gone, or not ours to remove

    def _remove_stale_temp_files(self) -> None:
        """Temp files an interrupted save left behind (only names atomic_write makes)."""
        for name, pattern in TEMP_NAMES.items():
            folder = self._own_folder(name)
            if folder is None:
                continue
            for p in folder.glob(".*.tmp"):
                if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)


def _image_names(state: StoreState) -> set[str]:
    return {name for c in state.classes for name in c.images} | {n.image for n in state.negatives if n.image}
