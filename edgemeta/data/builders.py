"""Turn official archives into the layouts edgemeta's loader reads (one zip per dataset, written
atomically): CIFAR-100 → CIFAR-FS, Tiny ImageNet → our 160-class subset."""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from edgemeta.runtime.errors import DataError
from edgemeta.runtime.files import atomic_write

# What a CIFAR-100 pickle may contain: dicts, lists, strings and numpy arrays. Anything else (a
# pickle can name any callable) is refused instead of executed.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f"the CIFAR-100 archive holds a pickle that names {module}.{name}; refusing to load it")
        return super().find_class(module, name)


def _unpickle(data: bytes) -> dict:
    return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def build_cifar_fs(archive: Path, out: Path, train: list[str], val: list[str], test: list[str]) -> dict[str, int]:
    """cifar-100-python.tar.gz → cifar-fs.zip: cifar-fs/<split>/<class>/NNN.png (the class's
    CIFAR-100 train images, then its test images), in the published train / val / test lists, which
    together must be CIFAR-100's 100 classes; classes.tsv lists class and split. Returns images per split."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            read = {m.name.split("/")[-1]: m for m in tar.getmembers() if m.isfile()}
            meta = _unpickle(tar.extractfile(read["meta"]).read())
            parts = [_unpickle(tar.extractfile(read[name]).read()) for name in ("train", "test")]
    except (tarfile.TarError, KeyError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise DataError(f"{archive} is not the CIFAR-100 python archive: {exc}") from None
    names = list(meta["fine_label_names"])
    if sorted(names) != sorted(train + val + test):
        odd = sorted(set(names) ^ set(train + val + test))
        raise DataError(f"{archive}: its classes are not CIFAR-FS's 64 + 16 + 20 (differing: {', '.join(odd[:5])})")
    split_of = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}
    images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(p["fine_labels"]) for p in parts])
    counts = {"train": 0, "val": 0, "test": 0}

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr("cifar-fs/classes.tsv", "class\tsplit\n" + "".join(f"{c}\t{split_of[c]}\n" for c in names))
            for label, name in enumerate(names):
                for i, idx in enumerate(np.flatnonzero(labels == label)):
                    z.writestr(f"cifar-fs/{split_of[name]}/{name}/{i:03d}.png", _png(images[idx]))
                    counts[split_of[name]] += 1
    atomic_write(out, write)
    return counts


def build_tiny_imagenet_fs(archive: Path, out: Path, names: dict[str, str]) -> int:
    """tiny-imagenet-200.zip → tiny-imagenet-fs.zip: for each class of `names` (wnid → words), its
    train images 0–99 and its 50 validation images, bytes unchanged, as tiny-imagenet-fs/<wnid>/…;
    classes.tsv maps wnid to words. Returns the number of images."""
    try:
        source = zipfile.ZipFile(archive)
        listing = set(source.namelist())
        annotations = source.read("tiny-imagenet-200/val/val_annotations.txt").decode()
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{archive} is not the Tiny ImageNet archive: {exc}") from None
    val_of: dict[str, list[str]] = {}
    for line in annotations.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            val_of.setdefault(fields[1], []).append(fields[0])
    count = [0]

    def write(f) -> None:
        with source, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr("tiny-imagenet-fs/classes.tsv", "".join(f"{w}\t{names[w]}\n" for w in sorted(names)))
            for wnid in sorted(names):
                files = [(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG", f"{wnid}_{i}.JPEG") for i in range(100)]
                files += [(f"tiny-imagenet-200/val/images/{v}", v) for v in sorted(val_of.get(wnid, []))]
                absent = [src for src, _ in files if src not in listing]
                if absent:
                    raise DataError(f"{archive} lacks {absent[0]} ({len(absent)} files of class {wnid})")
                for src, name in files:
                    z.writestr(f"tiny-imagenet-fs/{wnid}/{name}", source.read(src))
                    count[0] += 1
    atomic_write(out, write)
    return count[0]
