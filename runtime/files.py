"""The one way edgemeta writes a file: atomically and durably.

The bytes go to a temp file beside the target (`.NAME.XXXXXXXX.tmp`), are flushed and fsynced,
the temp file is renamed over the target and the folder is fsynced, so a crash, `kill -9` or power
loss at any moment leaves either the old file or the new one, never a torn one. Checkpoints,
bundle files and manifests, the enrollment store and the dataset cache all write through here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o644  # mkstemp makes 0600; bundles and stores are shared with other users and services


def atomic_write(path: str | os.PathLike, content: bytes | Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Replace `path` with `content` (bytes, or a function writing to a binary file object).
    durable=False skips the fsyncs (for caches, which can be rebuilt)."""
    import tempfile  # here, not at the top: a command that only reads (predict, classes) never pays for it
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray, memoryview)):
                f.write(content)
            else:
                content(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a full disk says ENOSPC but not where: the file it was writing
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def user_cache(name: str = "") -> Path:
    """edgemeta's per-user cache folder (EDGEMETA_CACHE, else ~/.cache/edgemeta), or its subfolder
    `name`: what can be rebuilt — dataset decodes, optimised graphs, variant measurements."""
    root = Path(os.environ.get("EDGEMETA_CACHE") or Path.home() / ".cache" / "edgemeta")
    return root / name if name else root


def trim_least_recently_used(paths: Iterable[Path], limit: int, keep: Path | None = None) -> None:
    """Delete the least recently used of a cache's `paths` (by mtime: a cache marks a file used with
    os.utime) until they total ≤ `limit` bytes; never `keep`. A file gone meanwhile is skipped."""
    entries = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):  # oldest use first
        if total <= limit:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size
