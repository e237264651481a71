"""ONNX Runtime's graph optimisation, done once per machine instead of at every start.

Creating a session on ONNX Runtime's CPU provider is mostly optimising the graph (fusions, the
NCHWc layout for this CPU's vector width): for EfficientNet-Lite0, tens of milliseconds of every
`edgemeta predict` in a shell loop. The first session on a machine saves the graph ONNX Runtime
optimised (its documented offline mode) into the user's cache — `$EDGEMETA_CACHE/ort-graphs/`,
else `~/.cache/edgemeta/ort-graphs/` — and later sessions load that with the optimisers off.

ONNX Runtime warns that such a graph may hold layouts for this hardware only, so a saved graph is
keyed by the source graph's sha256 (from the bundle's manifest), ONNX Runtime's version and the
CPU (model and instruction-set flags). Its file name ends in its own sha256, checked at each load:
a damaged copy is removed and rebuilt from the bundle's verified graph, never run. Where the cache
cannot be written, sessions are made as before. The folder keeps at most MAX_BYTES: saving a graph
removes the least recently used ones beyond that.
"""
from __future__ import annotations

import os
from pathlib import Path

FOLDER = "ort-graphs"
MAX_BYTES = 512 << 20  # a few dozen EfficientNet-Lite0 graphs


def cache_folder() -> Path:
    from ..files import user_cache
    return user_cache(FOLDER)


def graph_key(source_sha256: str) -> str:
    """What a saved graph is valid for: this source graph, this ONNX Runtime, this CPU."""
    from ..device_info import machine_key
    return machine_key(source_sha256)


def cached_graph(key: str) -> Path | None:
    """The graph saved for `key` whose content matches the sha256 in its name; a damaged one is removed."""
    from ..bundle import sha256_file
    for path in sorted(cache_folder().glob(f"{key}-*.onnx")):
        try:
            if sha256_file(path) == path.stem.rpartition("-")[2]:
                os.utime(path)  # used now: the last to be pruned
                return path
            path.unlink()
        except OSError:
            continue
    return None


def save_target(key: str) -> Path | None:
    """Where ONNX Runtime may write the optimised graph for `key` (a temporary name, made unique per
    process and thread), or None where the cache folder cannot be made."""
    folder = cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / f".{key}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def keep(saved: Path, key: str) -> None:
    """Give the graph ONNX Runtime wrote at `saved` its name (key and content sha256), atomically;
    a concurrent process saving the same graph renames onto the same name."""
    from ..bundle import sha256_file
    try:
        if saved.is_file():
            os.replace(saved, saved.with_name(f"{key}-{sha256_file(saved)}.onnx"))
            _prune(saved.parent)
    except OSError:
        pass
    finally:
        saved.unlink(missing_ok=True)


def _prune(folder: Path) -> None:
    """Remove the least recently used saved graphs while the folder holds more than MAX_BYTES, and
    what a process killed while saving left behind (temporary files over an hour old)."""
    import time

    from ..files import trim_least_recently_used
    for path in folder.glob("*.tmp"):
        try:
            if path.stat().st_mtime < time.time() - 3600:
                path.unlink()
        except OSError:
            continue
    trim_least_recently_used(folder.glob("*.onnx"), MAX_BYTES)
