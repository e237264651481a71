"""Load image datasets (Omniglot archive layout or plain class folders) into an ImageSet, cached on disk.

Layouts:
  omniglot  <root>/<Alphabet>/<characterNN>/*.png   class = Alphabet/characterNN, group = Alphabet
  folder    <root>/<class>/*.(png|jpg)              class = folder name,         group = class
Both read a folder or a .zip directly. Decoded, resized arrays are cached (keyed by the sources'
paths, sizes and mtimes, the image size and colour) so a second load is fast. The cache is bounded:
after each write the least recently used decodes beyond EDGEMETA_DATA_CACHE_GB (default 20 GB in
all) are deleted — one Tiny ImageNet decode at 160 px is 3.5 GB, and each size is its own.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.runtime.errors import DataError
from edgemeta.runtime.files import atomic_write, trim_least_recently_used, user_cache
from edgemeta.runtime.preprocess import InputSpec, load_image
from edgemeta.runtime.progress import SILENT, Progress

from .imageset import ImageSet
from .sources import iter_image_entries, source_fingerprint

CACHE_VERSION = 2  # 2: EXIF orientation, 16-bit scaling, JPEG draft decoding
CACHE_LIMIT_ENV, DEFAULT_CACHE_GB = "EDGEMETA_DATA_CACHE_GB", 20.0
_CACHE_NAME = re.compile(r"[0-9a-f]{24}\.npz")  # the decodes load_dataset writes; nothing else is touched
LAYOUTS = ("auto", "omniglot", "folder")
_CHARACTER_DIR = re.compile(r"character\d+$")


def load_dataset(sources: str | os.PathLike | list, image_size: int | tuple[int, int] = 28,
                 colour: str = "L", layout: str = "auto", cache_dir: str | os.PathLike | None = None,
                 progress: Progress = SILENT) -> ImageSet:
    """Load one or several sources (folders or zips) into one ImageSet.

    Several sources are merged by class; a drawing present in two sources (the Omniglot small
    archives overlap) is kept once.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    spec = InputSpec(height=h, width=w, colour=colour)
    key_text = "\n".join([f"v{CACHE_VERSION}", layout, f"{h}x{w}", colour]
                         + [source_fingerprint(s) for s in sources])
    cache_file = None
    if cache_dir is not False:
        cache_file = Path(cache_dir or user_cache()) / (hashlib.sha256(key_text.encode()).hexdigest()[:24] + ".npz")
        if cache_file.exists():
            try:
                dataset = _read_cache(cache_file)
                os.utime(cache_file)  # recently used: the last to be trimmed
                return dataset
            except Exception:  # a corrupt cache file is rebuilt, never trusted
                cache_file.unlink(missing_ok=True)
    limit = cache_limit_bytes()  # a bad setting fails before minutes of decoding
    dataset = _decode(sources, spec, layout, progress)
    if cache_file is not None:
        _write_cache(cache_file, dataset)
        decodes = (p for p in cache_file.parent.glob("*.npz") if _CACHE_NAME.fullmatch(p.name))
        trim_least_recently_used(decodes, limit, keep=cache_file)
    return dataset


def cache_limit_bytes() -> int:
    """The decoded-dataset cache's size limit, from EDGEMETA_DATA_CACHE_GB (a number of GB ≥ 0)."""
    text = os.environ.get(CACHE_LIMIT_ENV, "")
    try:
        gb = float(text) if text else DEFAULT_CACHE_GB
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):
        raise DataError(f"{CACHE_LIMIT_ENV} must be a size in GB ≥ 0 (e.g. 20), not {text!r}")
    return int(gb * 1e9)


def _decode(sources: list, spec: InputSpec, layout: str, progress: Progress) -> ImageSet:
    return index_images(sources, layout).decode(None, spec, progress)


@dataclass
class ImageIndex:
    """Every image of one or several sources, listed and labelled in load_dataset's order, none
    decoded: for a caller that needs a few hundred of them (an export's calibration sample) without
    decoding the rest — CIFAR-FS at 224 px is 7 GB decoded."""
    labels: np.ndarray  # int64 [N], the class of each image
    classes: list[str]
    groups: list[str]
    entries: list       # (path parts, read) of each image, in the same order

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, rows: np.ndarray | None, spec: InputSpec, progress: Progress = SILENT) -> ImageSet:
        """The images at `rows` (ascending; None for all) decoded to the spec, in an ImageSet that
        keeps every class of the index and its labels."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        pixels = np.empty((len(rows), spec.height, spec.width, spec.channels), np.uint8)
        progress.start("decoding images", len(rows))
        for i, row in enumerate(rows):
            parts, read = self.entries[row]
            pixels[i] = _decode_one(parts, read, spec)
            progress.update(i + 1)
        progress.finish()
        return ImageSet(pixels, self.labels[rows], self.classes, self.groups)


def index_images(sources: str | os.PathLike | list, layout: str = "auto") -> ImageIndex:
    """List and label the images of one or several sources (merged by class, as load_dataset does)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("no data source given")
    if layout not in LAYOUTS:
        raise DataError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    entries = {}
    for source in sources:
        for parts, read in iter_image_entries(source):
            entries.setdefault(parts[-3:] if len(parts) >= 3 else ("",) * (3 - len(parts)) + parts, read)
    if not entries:
        raise DataError(f"no images found in {', '.join(map(str, sources))}")
    if layout == "auto":
        layout = "omniglot" if all(_CHARACTER_DIR.match(p[-2]) for p in entries) else "folder"
    by_class: dict[tuple[str, str], list] = defaultdict(list)
    for parts, read in entries.items():
        if layout == "omniglot":
            if not parts[0]:
                raise DataError(f"{'/'.join(parts)} is not in the Omniglot layout <Alphabet>/<characterNN>/<file>.png")
            by_class[(parts[0], f"{parts[0]}/{parts[1]}")].append((parts, read))
        else:
            if not parts[1]:
                raise DataError(f"image {parts[2]} is not inside a class folder; use <root>/<class>/<image>")
            by_class[(parts[1], parts[1])].append((parts, read))
    keys = sorted(by_class)
    ordered = [entry for key in keys for entry in by_class[key]]
    labels = np.repeat(np.arange(len(keys), dtype=np.int64), [len(by_class[key]) for key in keys])
    return ImageIndex(labels, [name for _, name in keys], [group for group, _ in keys], ordered)


def _read_cache(path: Path) -> ImageSet:
    with np.load(path, allow_pickle=False) as z:
        return ImageSet(z["pixels"], z["labels"], z["classes"].tolist(), z["groups"].tolist())


def _write_cache(path: Path, dataset: ImageSet) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, pixels=dataset.pixels, labels=dataset.labels,
                                              classes=np.array(dataset.classes, dtype=str),
                                              groups=np.array(dataset.groups, dtype=str)), durable=False)
    except OSError:
        pass  # a cache that cannot be written only costs time


def _decode_one(parts: tuple[str, ...], read, spec: InputSpec) -> np.ndarray:
    try:
        return load_image(read(), spec)
    except DataError as exc:
        raise DataError(f"{'/'.join(p for p in parts if p)}: {exc}") from None
