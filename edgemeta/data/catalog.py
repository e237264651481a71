"""The datasets edgemeta's configs use, where they come from, and how to check them: one table.

Each dataset names the official files (URLs, checksums) and the *parts* a config reads
(`data = ["omniglot:background"]`), which are paths under the data root. Where the official file is
not already what the loader reads, a builder writes the part from it (CIFAR-100 → CIFAR-FS,
Tiny ImageNet → our 160-class layout).

The checksums pinned here are the MD5s that torchvision and the few-shot libraries verify these
archives by (the dataset authors publish none); the Tiny ImageNet size is the archive's. A file's
SHA-256 is recorded at its first verified fetch, and `edgemeta data verify` checks both from then on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.runtime.errors import ConfigError, DataError

REPO_SPLITS = Path(__file__).resolve().parent.parent.parent / "data" / "splits"


@dataclass(frozen=True)
class RemoteFile:
    name: str                       # the official file name; downloads keep it
    urls: tuple[str, ...]           # official first; --mirror / EDGEMETA_DATA_MIRRORS are tried before these
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    keep_as: str | None = None      # where it lives under the root when it is itself a part (else downloads/NAME)

    def path(self, root: Path) -> Path:
        return root / (self.keep_as or f"downloads/{self.name}")


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    license: str
    files: tuple[RemoteFile, ...]
    parts: dict[str, str]                           # part → path under the root, as configs read it
    build: Callable[[Path], None] | None = None     # (root) → writes the parts from the downloaded files
    terms: str | None = None                        # must be accepted (--accept-terms) before fetching
    notes: str = ""
    default_part: str = field(default="")

    def part_path(self, root: Path, part: str | None = None) -> Path:
        part = part or self.default_part or next(iter(self.parts))
        if part not in self.parts:
            raise ConfigError(f"{self.name} has no part {part!r}; it has {', '.join(self.parts)}")
        return root / self.parts[part]


def split_classes(name: str) -> dict:
    """The class lists of a split file shipped in the repository's data/splits/."""
    path = REPO_SPLITS / name
    if not path.is_file():
        raise DataError(f"building this dataset needs the class lists in data/splits/{name} of an edgemeta "
                        "source checkout; run `edgemeta data fetch` from the repository")
    return json.loads(path.read_text())


def _build_cifar_fs(root: Path) -> None:
    from edgemeta.data.builders import build_cifar_fs
    split = split_classes("cifar-fs.json")
    build_cifar_fs(CATALOG["cifar-fs"].files[0].path(root), root / CATALOG["cifar-fs"].parts["all"],
                   split["train"], split["val"], split["test"])


def _build_tiny_imagenet(root: Path) -> None:
    from edgemeta.data.builders import build_tiny_imagenet_fs
    split = split_classes("tiny-imagenet-fs.json")
    build_tiny_imagenet_fs(CATALOG["tiny-imagenet"].files[0].path(root), root / CATALOG["tiny-imagenet"].parts["all"], split["names"])


OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
CATALOG: dict[str, Dataset] = {d.name: d for d in (
    Dataset("omniglot", "Omniglot (Lake et al. 2015): 1,623 handwritten characters of 50 alphabets, 105×105",
            "MIT (Brenden Lake)",
            (RemoteFile("images_background.zip", (OMNIGLOT_URL + "images_background.zip",),
                        md5="68d2efa1b9178cc56df9314c21c6e718", keep_as="omniglot/images_background.zip"),
             RemoteFile("images_evaluation.zip", (OMNIGLOT_URL + "images_evaluation.zip",),
                        md5="6b91aef0f799c5bb55b94e3f2daec811", keep_as="omniglot/images_evaluation.zip")),
            {"background": "omniglot/images_background.zip", "evaluation": "omniglot/images_evaluation.zip"},
            default_part="background"),
    Dataset("cifar-fs", "CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 split 64 train / 16 val / 20 test classes, 32×32",
            "CIFAR-100: research use, cite Krizhevsky (2009); never redistributed by edgemeta",
            (RemoteFile("cifar-100-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                        md5="eb9058c3a382ffc7106e4002c42a8d85"),),
            {"all": "cifar-fs.zip"}, build=_build_cifar_fs,
            notes="built into cifar-fs.zip: cifar-fs/{train,val,test}/<class>/NNN.png"),
    Dataset("tiny-imagenet", "Tiny ImageNet classes (160 of the 200, 150 images each), 64×64, edgemeta's split",
            "ImageNet terms: non-commercial research and education only, no redistribution",
            (RemoteFile("tiny-imagenet-200.zip", ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
                        md5="90528d7ca1a48142e341f4ef8d21d0de", size=248_100_043),),
            {"all": "tiny-imagenet-fs.zip"}, build=_build_tiny_imagenet,
            terms="Tiny ImageNet is ImageNet data: for non-commercial research and education only, never redistributed "
                  "(https://image-net.org/download.php). Pass --accept-terms to say you accept these terms.",
            notes="built into tiny-imagenet-fs.zip: tiny-imagenet-fs/<wnid>/*.JPEG (train 0-99 + the 50 validation images)"),
)}


def parse_name(text: str) -> tuple[Dataset, str | None]:
    """'omniglot', 'omniglot:evaluation' → (dataset, part or None)."""
    name, _, part = text.partition(":")
    if name not in CATALOG:
        raise ConfigError(f"unknown dataset {name!r}; edgemeta knows {', '.join(CATALOG)} (`edgemeta data list`)")
    dataset = CATALOG[name]
    if part and part not in dataset.parts:
        raise ConfigError(f"{name} has no part {part!r}; it has {', '.join(dataset.parts)}")
    return dataset, part or None


def default_root() -> Path:
    """The data root: EDGEMETA_DATA, else the per-user cache (XDG_CACHE_HOME or ~/.cache)/edgemeta/data."""
    env = os.environ.get("EDGEMETA_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "edgemeta" / "data"
