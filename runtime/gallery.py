"""Galleries: a store's enrolled classes in one portable, checksummed file, to back up a device
or deploy the same classes to many.

A gallery is an .npz (no pickles) holding a JSON header — format, model sha256, variant, embedding
size, head, the classes with their shot counts and kept-image names, the negative examples
(corrections "not any of these") — the support and negative embeddings, and
with images=True the kept image files, so a device with another model can re-embed them. The header
carries the sha256 of every array; an import checks it, and every bound, before anything changes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import StoreError
from .files import atomic_write
from .heads import HeadConfig, NewerHeadError
from .store import (
    KEPT_NAME,
    MAX_CLASSES,
    MAX_NEGATIVES,
    MAX_SHOTS,
    EnrolledClass,
    EnrollmentStore,
    Negative,
    StoreState,
    check_embeddings,
    check_format,
    check_limit,
    class_entry,
    decode_negatives,
    frozen,
    needs_version_2,
    with_negatives,
)

GALLERY_FORMAT = "edgemeta-gallery"
GALLERY_VERSION = 2  # 2: negative examples; a gallery without them is written as version 1
MAX_IMAGE_BYTES = 64 << 20
MAX_HEADER_BYTES = 64 << 20
MAX_DIM = 1 << 16
NPY_HEADER_BYTES = 4096  # an .npy member's own header, beyond its data
# A compressed member may inflate to at most this many times its stored size (1 MB of slack):
# embeddings and images barely compress (edgemeta writes them stored), so a member of zeros that
# would inflate a 500 kB file to gigabytes is refused before it is read.
MAX_INFLATION = 8
CONFLICTS = ("skip", "add", "replace", "error")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def export_gallery(store_path: str | os.PathLike, out: str | os.PathLike, images: bool = False) -> dict:
    """Write the store's classes to one gallery file (atomically); returns its header."""
    store = EnrollmentStore(store_path)
    state = store.read()
    if state is None:
        raise StoreError(f"no store at {store_path}; enroll classes first")
    if not state.classes:
        raise StoreError(f"the store at {store_path} has no classes to export")
    arrays = {"embeddings": np.concatenate([c.embeddings for c in state.classes]).astype(np.float32)}
    if images:
        missing = [c.label for c in state.classes if not c.images]
        if missing:
            raise StoreError(f"class {missing[0]!r} kept no images; export without --with-images, or enroll it again")
        kept = {n for c in state.classes for n in c.images} | {n.image for n in state.negatives if n.image}
        for name in sorted(kept):
            arrays[f"image_{name}"] = np.frombuffer(store.image_path(name).read_bytes(), np.uint8)
    if state.negative_matrix is not None:
        arrays["negatives"] = state.negative_matrix.astype(np.float32)
    header = {"format": GALLERY_FORMAT, "version": GALLERY_VERSION if needs_version_2(state.classes, state.negatives) else 1,
              "model_sha256": state.model_sha256,
              "variant": state.variant, "embedding_dim": state.embedding_dim, "head": state.head.to_dict(),
              "classes": [class_entry(c, c.images if images else ()) for c in state.classes],
              "sha256": {k: _digest(v) for k, v in arrays.items()}}
    if state.negatives:
        header["negatives"] = [{"note": n.note, "image": n.image if images else ""} for n in state.negatives]
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]
    atomic_write(out, buf.getvalue())
    return header


def read_gallery(path: str | os.PathLike) -> tuple[dict, list[EnrolledClass], dict[str, bytes], tuple[Negative, ...]]:
    """Read and check a gallery: (header, classes, kept images by name, negative examples). Anything wrong — not a
    gallery, a checksum, a shape, a NaN, a path for an image name, a count out of bounds — raises
    StoreError with one line; nothing is written."""
    where = str(path)
    header, arrays = _read_members(path, where)
    check_format(header, GALLERY_FORMAT, GALLERY_VERSION, "gallery", where)
    try:
        sums, entries, dim = header["sha256"], header["classes"], header["embedding_dim"]
        HeadConfig.from_dict(header["head"], f"{where}: head")
        if set(sums) != set(arrays) or any(_digest(arrays[k]) != v for k, v in sums.items()):
            raise StoreError(f"{where} does not match its checksums (damaged or edited); export it again")
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_CLASSES:
            raise StoreError(f"{where}: {len(entries) if isinstance(entries, list) else '?'} classes is out of bounds")
        embeddings = arrays["embeddings"]
        if isinstance(dim, bool) or not isinstance(dim, int) or embeddings.ndim != 2 or embeddings.shape[1] != dim \
                or embeddings.dtype != np.float32:
            raise StoreError(f"{where}: embeddings {embeddings.shape} {embeddings.dtype} do not match dim {dim}")
        if not np.isfinite(embeddings).all():
            raise StoreError(f"{where} holds non-finite embeddings")
        images = {k[len("image_"):]: v.tobytes() for k, v in arrays.items() if k.startswith("image_")}
        if any(not KEPT_NAME.fullmatch(n) or len(b) > MAX_IMAGE_BYTES
               or hashlib.sha256(b).hexdigest()[:32] != n[:32] for n, b in images.items()):
            raise StoreError(f"{where} names images that are not content-addressed kept images")
        check_embeddings(embeddings, where)
        classes, start = [], 0
        from .labels import check_label, migrate_label
        for entry in entries:
            if not isinstance(entry.get("label"), str):
                raise StoreError(f"{where}: class label {entry.get('label')!r} is not text")
            shots, names = entry["shots"], tuple(entry.get("images", []))
            if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= MAX_SHOTS \
                    or start + shots > len(embeddings):
                raise StoreError(f"{where}: class {entry.get('label')!r} claims {shots!r} shots the file does not hold")
            if any(n not in images for n in names):
                raise StoreError(f"{where}: class {entry['label']!r} names images the file does not hold")
            classes.append(EnrolledClass(check_label(migrate_label(entry["label"])), frozen(embeddings[start:start + shots]), names,
                                         check_limit(entry.get("limit"), where)))
            start += shots
        if start != len(embeddings):
            raise StoreError(f"{where}: the class list does not match the embeddings")
        negatives = decode_negatives(header.get("negatives", []), arrays.get("negatives"), dim, where)
        if any(n.image and n.image not in images for n in negatives):
            raise StoreError(f"{where}: a negative names an image the file does not hold")
        seen: set[str] = set()
        for c in classes:
            if c.label in seen:
                raise StoreError(f"{where}: class {c.label!r} appears twice; a gallery holds each class once")
            seen.add(c.label)
    except NewerHeadError as exc:  # not damage: a newer edgemeta's gallery
        raise StoreError(f"{exc}; nothing was changed") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{where} is damaged ({exc})") from None
    return header, classes, images, negatives


def read_header(path: str | os.PathLike) -> dict:
    """A gallery's JSON header alone (no embeddings or images read)."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("header.npy")
        if info.file_size > MAX_HEADER_BYTES:
            raise StoreError(f"{path}: header over {MAX_HEADER_BYTES >> 20} MB")
        return json.loads(str(np.load(io.BytesIO(zf.read(info)), allow_pickle=False)))


def _read_members(path: str | os.PathLike, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The header, then — only once every member's declared size fits what the header says and
    the limits — the arrays. A forged size cannot make us decompress more: zipfile stops reading a
    member at its declared size."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if "header.npy" not in infos:
                raise StoreError(f"{where} is not a gallery (no header)")
            header = read_header(path)
            check_format(header, GALLERY_FORMAT, GALLERY_VERSION, "gallery", where)
            sha, variant = header.get("model_sha256"), header.get("variant")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha) or not isinstance(variant, str) \
                    or not 1 <= len(variant) <= 32:
                raise StoreError(f"{where}: its header does not name the model it was made for (model_sha256 "
                                 f"{sha!r}, variant {variant!r}); export it again from the store")
            entries, dim = header.get("classes"), header.get("embedding_dim")
            if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_CLASSES:
                raise StoreError(f"{where}: {len(entries) if isinstance(entries, list) else '?'} classes; "
                                 f"a gallery holds 1–{MAX_CLASSES:,}")
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
                raise StoreError(f"{where}: embedding size {dim!r} is out of bounds")
            shots = [e.get("shots") if isinstance(e, dict) else None for e in entries]
            for e, n in zip(entries, shots):
                if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHOTS:
                    label = e.get("label") if isinstance(e, dict) else e
                    raise StoreError(f"{where}: class {label!r} has {n!r} shots; a class holds 1–{MAX_SHOTS:,}")
            rows = sum(int(n) for n in shots if n is not None)
            negatives = header.get("negatives", [])
            if not isinstance(negatives, list) or len(negatives) > MAX_NEGATIVES:
                raise StoreError(f"{where}: the negatives are not a list of at most {MAX_NEGATIVES:,}")
            limits = {"embeddings.npy": rows * dim * 4 + NPY_HEADER_BYTES,
                      "negatives.npy": len(negatives) * dim * 4 + NPY_HEADER_BYTES}
            for name, info in infos.items():
                if name == "header.npy":
                    continue
                limit = limits.get(name, MAX_IMAGE_BYTES + NPY_HEADER_BYTES if name.startswith("image_") else -1)
                if info.file_size > limit:
                    raise StoreError(f"{where}: member {name} declares {info.file_size:,} bytes, more than its header "
                                     f"allows ({max(limit, 0):,}); refused before decompressing")
                if info.file_size > MAX_INFLATION * info.compress_size + (1 << 20):
                    raise StoreError(f"{where}: member {name} would inflate {info.compress_size:,} bytes to "
                                     f"{info.file_size:,} (over {MAX_INFLATION}×); refused before decompressing")
            arrays = {name[:-len(".npy")]: np.load(io.BytesIO(zf.read(info)), allow_pickle=False)
                      for name, info in infos.items() if name != "header.npy"}
    except FileNotFoundError:
        raise StoreError(f"gallery not found: {where}") from None
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"{where} is not a readable gallery ({exc})") from None
    return header, arrays


def import_gallery(path: str | os.PathLike, store_path: str | os.PathLike, replace_all: bool = False,
                   on_conflict: str = "error", classifier=None) -> StoreState:
    """Apply a gallery to a store in one atomic save. replace_all: the store's classes become the
    gallery's; otherwise they merge, and a label in both follows on_conflict (skip: keep the
    store's; add: append the gallery's shots; replace: take the gallery's; error: change nothing).
    A gallery made for another model than the store (or than `bundle`) is refused unless it carries
    its images and `classifier` (a FewShotClassifier on the store's bundle) is given: the images are
    then re-embedded with it."""
    if on_conflict not in CONFLICTS:
        raise StoreError(f"--on-conflict must be one of {', '.join(CONFLICTS)}, not {on_conflict!r}")
    store = EnrollmentStore(store_path)
    _check_dimension_first(path, store, classifier)
    header, classes, images, incoming_negatives = read_gallery(path)
    with store.locked():
        saved = store.read()
        target = ((saved.model_sha256, saved.variant) if saved is not None else
                  (classifier.bundle.model_sha256, classifier.variant) if classifier is not None else
                  (header["model_sha256"], header["variant"]))
        if (header["model_sha256"], header["variant"]) != target:
            classes, incoming_negatives = _reembed(classes, incoming_negatives, images, classifier, target, header, path)
        dim = saved.embedding_dim if saved is not None else classifier.bundle.embedding_dim if classifier is not None else None
        if dim is not None and classes[0].embeddings.shape[1] != dim:
            raise StoreError(f"{path} holds {classes[0].embeddings.shape[1]}-d embeddings; the model it names makes "
                             f"{dim}-d ones (the gallery was edited); nothing was changed")
        head = saved.head if saved is not None else HeadConfig.from_dict(header["head"])
        current = list(saved.classes) if saved is not None and not replace_all else []
        merged = _merge(current, classes, on_conflict)  # a refused conflict leaves no file behind
        for name in {n for c in classes for n in c.images} | {n.image for n in incoming_negatives if n.image}:
            store.keep_image(images[name], Path(name).suffix)
        negatives = with_negatives(saved.negatives if saved is not None and not replace_all else (), incoming_negatives)
        from .classifier import fit_head
        from .store import check_counts
        check_counts(len(merged), {c.label: c.shots for c in merged}, str(path))
        dim = int(merged[0].embeddings.shape[1])
        state = StoreState(target[0], target[1], dim, head, tuple(merged), {},
                           (saved.generation + 1) if saved is not None else 0, negatives)
        state = replace(state, fitted={k: frozen(v) for k, v in fit_head(head, state.classes).items()})
        store.write(state)
    return state


def _check_dimension_first(path, store: EnrollmentStore, classifier) -> None:
    """A gallery for the store's (or bundle's) own model must have its embedding size: checked on
    the header alone, before any member is inflated."""
    try:
        header = read_header(path)
    except Exception:  # not a gallery at all: read_gallery says so in its one line
        return
    if not isinstance(header, dict):
        return
    saved = store.read() if store.exists() else None
    target = ((saved.model_sha256, saved.variant, saved.embedding_dim) if saved is not None else
              (classifier.bundle.model_sha256, classifier.variant, classifier.bundle.embedding_dim)
              if classifier is not None else None)
    if target is not None and (header.get("model_sha256"), header.get("variant")) == target[:2] \
            and header.get("embedding_dim") != target[2]:
        raise StoreError(f"{path} declares {header.get('embedding_dim')!r}-d embeddings; the model it names makes "
                         f"{target[2]}-d ones (the gallery was edited); nothing was changed")


def _merge(current: list[EnrolledClass], incoming: list[EnrolledClass], on_conflict: str) -> list[EnrolledClass]:
    merged = list(current)
    index = {c.label: i for i, c in enumerate(merged)}
    for c in incoming:
        i = index.get(c.label)
        if i is None:
            index[c.label] = len(merged)
            merged.append(c)
        elif on_conflict == "error":
            raise StoreError(f"class {c.label!r} is in the store and in the gallery; choose --on-conflict "
                             "skip|add|replace, or --replace the whole store; nothing was changed")
        elif on_conflict == "add":
            old = merged[i]
            merged[i] = EnrolledClass(c.label, frozen(np.concatenate([old.embeddings, c.embeddings])), old.images + c.images,
                                      old.limit if old.limit is not None else c.limit)
        elif on_conflict == "replace":
            merged[i] = c
    return merged


def _reembed(classes, negatives, images, classifier, target, header, path):
    """The gallery's classes and negatives embedded with the store's bundle from the images it carries."""
    other = f"{path} was made for another model (sha {header['model_sha256'][:12]}…, {header['variant']})"
    if not all(c.images for c in classes):
        raise StoreError(f"{other} and carries no images to re-embed; export it with --with-images, "
                         "or enroll the classes again")
    if classifier is None or (classifier.bundle.model_sha256, classifier.variant) != target:
        raise StoreError(f"{other}; pass the store's bundle (--bundle) to re-embed its images")
    return classifier.reembed(classes, negatives, images.__getitem__)
