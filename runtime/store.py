"""The enrollment store: support embeddings per class and the fitted head, on disk.

A folder holding `enrollment.npz` (no pickles) and, when asked, the enrolled images under
`images/` (content-addressed) so a store can be re-embedded for a new bundle. Every save writes a
temp file, fsyncs it and renames it over the old one, so a crash or `kill -9` at any moment leaves
the previous state loadable. Writers from several processes serialise on an advisory lock file.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import atomic_write_bytes
from .errors import StoreError

STORE_FORMAT = "edgemeta-store"
STORE_VERSION = 1
STATE_FILE = "enrollment.npz"
LOCK_FILE = ".lock"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class EnrolledClass:
    label: str
    embeddings: np.ndarray              # float32 [shots, D], read-only
    images: tuple[str, ...] = ()        # kept image file names under images/, if any

    @property
    def shots(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class StoreState:
    """An immutable snapshot: what is enrolled and for which model."""

    model_sha256: str
    variant: str
    embedding_dim: int
    head: dict
    classes: tuple[EnrolledClass, ...] = ()
    fitted: dict = field(default_factory=dict)  # name -> array, the fitted head
    generation: int = 0

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    def find(self, label: str) -> int | None:
        for i, c in enumerate(self.classes):
            if c.label == label:
                return i
        return None


def frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def encode_state(state: StoreState) -> bytes:
    header = {"format": STORE_FORMAT, "version": STORE_VERSION, "model_sha256": state.model_sha256,
              "variant": state.variant, "embedding_dim": state.embedding_dim, "head": state.head,
              "generation": state.generation,
              "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "classes": [{"label": c.label, "shots": c.shots, "images": list(c.images)} for c in state.classes],
              "fitted": sorted(state.fitted)}
    arrays = {"header": np.array(json.dumps(header)),
              "embeddings": (np.concatenate([c.embeddings for c in state.classes]) if state.classes
                             else np.zeros((0, state.embedding_dim), np.float32))}
    arrays.update({f"fitted_{k}": v for k, v in state.fitted.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_state(data: bytes, where: str) -> StoreState:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            embeddings = z["embeddings"].astype(np.float32)
            fitted = {k: frozen(z[f"fitted_{k}"]) for k in header.get("fitted", [])}
    except Exception as exc:
        raise StoreError(f"{where} is not a readable enrollment store ({exc})") from None
    if header.get("format") != STORE_FORMAT:
        raise StoreError(f"{where} is not an edgemeta enrollment store")
    if header.get("version", 0) > STORE_VERSION:
        raise StoreError(f"{where} was written by a newer edgemeta (store version {header['version']}); upgrade edgemeta")
    classes, start = [], 0
    for c in header["classes"]:
        classes.append(EnrolledClass(c["label"], frozen(embeddings[start:start + c["shots"]]), tuple(c.get("images", []))))
        start += c["shots"]
    return StoreState(header["model_sha256"], header.get("variant", "fp32"), header["embedding_dim"], header["head"],
                      tuple(classes), fitted, header.get("generation", 0))


class EnrollmentStore:
    """A store folder. `read()` returns the last complete state; `write()` replaces it atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._seen: tuple | None = None  # stat of the state file at our last read or write

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
            return None
        stamp = self._stamp()
        state = decode_state(self.state_file.read_bytes(), str(self.state_file))
        self._seen = stamp
        return state

    def read_if_changed(self) -> StoreState | None:
        """The saved state if another writer replaced it since our last read or write, else None
        (a stat instead of decoding the whole store on every enroll)."""
        stamp = self._stamp()
        return None if stamp is None or stamp == self._seen else self.read()

    def write(self, state: StoreState) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.state_file, encode_state(state))
        self._seen = self._stamp()
        self._remove_orphan_images(state)

    @contextlib.contextmanager
    def locked(self):
        """Exclusive advisory lock across processes for a read-modify-write."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as f:
            try:
                import fcntl
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            yield

    def keep_image(self, data: bytes, suffix: str) -> str:
        """Store an image's bytes under images/ (content-addressed, durable); returns its file name."""
        folder = self.path / IMAGES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(data).hexdigest()[:32] + (suffix.lower() if suffix else ".img")
        if not (folder / name).exists():
            atomic_write_bytes(folder / name, data)
        return name

    def image_path(self, name: str) -> Path:
        return self.path / IMAGES_DIR / name

    def _remove_orphan_images(self, state: StoreState) -> None:
        folder = self.path / IMAGES_DIR
        if not folder.is_dir():
            return
        used = {name for c in state.classes for name in c.images}
        for p in folder.iterdir():
            if p.name not in used and not p.name.startswith("."):
                p.unlink(missing_ok=True)
