"""List image files in a folder or a .zip archive without extracting it."""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from edgemeta.runtime.errors import DataError
from edgemeta.runtime.preprocess import IMAGE_EXTENSIONS

# (path parts relative to the source root, a function returning the file's bytes)
ImageEntry = tuple[tuple[str, ...], Callable[[], bytes]]


def data_root() -> Path:
    """The data root: EDGEMETA_DATA, else the per-user cache folder (edgemeta.data.catalog.default_root)."""
    from edgemeta.data.catalog import default_root
    return default_root()


def resolve_source(source: str | os.PathLike) -> Path:
    """A data source: a dataset name (`omniglot:background`, `cifar-fs`; see `edgemeta data list`)
    under the data root; else a path as given if it exists; else the same relative name under the
    data root. A recorded path from another machine (`../data/omniglot/x.zip`) is also tried by its
    trailing parts (`omniglot/x.zip`, then `x.zip`) under the data root."""
    from edgemeta.data.catalog import CATALOG, parse_name
    root = data_root()
    text = os.fspath(source)
    if text.partition(":")[0] in CATALOG:
        dataset, part = parse_name(text)
        path = dataset.part_path(root, part)
        if not path.is_file():
            raise DataError(f"dataset {text} is not under the data root {root}: run `edgemeta data fetch {dataset.name}` "
                            "(or set EDGEMETA_DATA to the folder that holds it)")
        return path
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = [p for p in path.parts if p not in ("..", ".", path.anchor)]
    for i in range(len(parts)):
        if (root / Path(*parts[i:])).exists():
            return root / Path(*parts[i:])
    raise DataError(f"data path not found: {path} (nor under the data root {root}; set EDGEMETA_DATA, or "
                    "`edgemeta data fetch NAME` a known dataset). Pass a folder or a .zip of images.")


def iter_image_entries(source: str | os.PathLike) -> Iterator[ImageEntry]:
    """Yield every image file under a folder or inside a zip, sorted by path, hidden files skipped."""
    path = resolve_source(source)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is neither a folder nor a .zip archive")
        archive = zipfile.ZipFile(path)
        names = sorted(n for n in archive.namelist() if _is_image(PurePosixPath(n)))
        for name in names:
            yield PurePosixPath(name).parts, (lambda n=name: archive.read(n))
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p.relative_to(path)))
    for p in files:
        yield p.relative_to(path).parts, p.read_bytes


def _is_image(rel: PurePosixPath | Path) -> bool:
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)
    return not hidden and rel.suffix.lower() in IMAGE_EXTENSIONS


def source_fingerprint(source: str | os.PathLike) -> str:
    """A string that changes when the source's content changes (path, sizes, mtimes)."""
    path = resolve_source(source).resolve()
    if path.is_file():
        st = path.stat()
        return f"{path}|{st.st_size}|{st.st_mtime_ns}"
    parts = [str(path)]
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)
