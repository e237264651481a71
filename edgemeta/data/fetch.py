"""`edgemeta data fetch | verify`: download the catalog's files, resumably, verified before use,
atomically (a partial download is `NAME.part` and never looks complete), then build the parts.

The data root holds the parts (what configs read), `downloads/` (official archives that a builder
turned into parts) and `.edgemeta-data.json`, the ledger of what was verified: each file's size,
md5 and sha256 at its verified fetch, so `verify` catches a file changed since.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgemeta.data.catalog import CATALOG, Dataset, RemoteFile
from edgemeta.runtime.errors import ConfigError, DataError
from edgemeta.runtime.files import atomic_write
from edgemeta.runtime.progress import SILENT, Progress

LEDGER = ".edgemeta-data.json"
CHUNK = 1 << 20
USER_AGENT = "edgemeta-data/1"


def mirrors_from_env() -> tuple[str, ...]:
    """EDGEMETA_DATA_MIRRORS: base URLs (space-separated) holding the files under their official names."""
    return tuple(os.environ.get("EDGEMETA_DATA_MIRRORS", "").split())


def digests(path: Path) -> dict:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def mismatch(f: RemoteFile, found: dict) -> str | None:
    """Why `found` (digests) is not the pinned file, or None."""
    for key in ("size", "md5", "sha256"):
        want = getattr(f, key)
        if want is not None and found[key] != want:
            return f"{key} {found[key]}, expected {want}"
    return None


def read_ledger(root: Path) -> dict:
    try:
        data = json.loads((root / LEDGER).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _record(root: Path, entries: dict) -> None:
    ledger = read_ledger(root)
    ledger.update(entries)
    atomic_write(root / LEDGER, (json.dumps(ledger, indent=1, sort_keys=True) + "\n").encode())


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


MIN_RATE = 10_000  # bytes/s a transfer must average once it has run for --timeout seconds


def _download(url: str, part: Path, progress: Progress, timeout: float, max_bytes: int | None = None) -> None:
    """Append to `part` from where it stops (HTTP Range), or start over when the server ignores ranges.
    Bounded in time (after `timeout` seconds the transfer must average MIN_RATE: a server dripping
    bytes cannot hold it for ever) and in size (never more than `max_bytes`, the file's known size,
    whatever the server says or does not say)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already whole
            return
        raise
    with response:
        resumed = response.status == 206  # else the server sent the whole file: start over
        done = have if resumed else 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length and length.isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise _TooLarge(f"the server offers {total:,} bytes; the file is {max_bytes:,}")
        progress.start(f"download {part.name[:-5]}", total, done)
        t0, first = time.monotonic(), done
        with open(part, "ab" if resumed else "wb") as out:
            while True:
                try:
                    chunk = response.read1(CHUNK)  # what has arrived: a slow server is seen, not waited for
                except Exception as exc:  # IncompleteRead, reset, timeout: keep what arrived
                    raise _Interrupted(f"{done:,} of {total or '?':,} bytes" if total else f"{done:,} bytes") from exc
                if not chunk:
                    break
                if max_bytes is not None and done + len(chunk) > max_bytes:
                    raise _TooLarge(f"the server sent more than the file's {max_bytes:,} bytes")
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise _DiskError(exc.strerror or str(exc)) from None
                done += len(chunk)
                progress.update(done)
                elapsed = time.monotonic() - t0
                if elapsed > timeout and (done - first) / elapsed < MIN_RATE:
                    raise _Interrupted(f"{done:,} bytes at {(done - first) / elapsed:,.0f} B/s, under {MIN_RATE:,} B/s "
                                       f"after {elapsed:.0f} s")
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise _DiskError(exc.strerror or str(exc)) from None
        progress.finish()
        if total is not None and done < total:
            raise _Interrupted(f"{done:,} of {total:,} bytes")


class _Interrupted(Exception):
    pass


class _TooLarge(Exception):
    pass


class _DiskError(Exception):
    pass


def fetch_file(f: RemoteFile, root: Path, *, mirrors: tuple[str, ...] = (), progress: Progress = SILENT,
               timeout: float = 30.0, dataset: str = "") -> Path:
    """Download one file (mirrors first, then the official URLs), verify it, move it into place."""
    target = f.path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    urls = [m.rstrip("/") + "/" + f.name for m in mirrors] + list(f.urls)
    failures = []
    for url in urls:
        try:
            _download(url, part, progress, timeout, f.size)
            break
        except _DiskError as exc:
            progress.finish()
            part.unlink(missing_ok=True)
            raise DataError(f"cannot write {part}: {exc}; the partial file was removed. Free space "
                            f"({f.size or 'the file'} bytes needed) and run the same command again") from None
        except _TooLarge as exc:
            progress.finish()
            part.unlink(missing_ok=True)
            failures.append(f"{url} ({exc})")
        except _Interrupted as exc:
            progress.finish()
            raise DataError(f"the download of {f.name} from {url} stopped after {exc}; the partial file {part} is kept: "
                            f"run the same command again to resume") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            progress.finish()
            reason = getattr(exc, "reason", None) or exc
            failures.append(f"{url} ({reason})")
    else:
        raise DataError(f"could not download {f.name}: {'; '.join(failures)}. Download it yourself (or ask a colleague), "
                        f"then: edgemeta data fetch {dataset} --from {f.name}" + _digest_hint(f))
    _install(f, part, target, root, source=urls[len(failures)], dataset=dataset)
    return target


def _digest_hint(f: RemoteFile) -> str:
    pins = ", ".join(f"{k} {getattr(f, k)}" for k in ("md5", "sha256") if getattr(f, k))
    return f" (it must have {pins})" if pins else ""


def _install(f: RemoteFile, part: Path, target: Path, root: Path, source: str, dataset: str) -> None:
    """Verify `part` against the pinned checksums; rename it over `target` only when it matches."""
    found = digests(part)
    why = mismatch(f, found)
    if why is not None:
        part.unlink(missing_ok=True)
        raise DataError(f"{f.name} from {source} is not the expected file ({why}); it was removed, nothing was installed. "
                        f"Try another --mirror, or place the right file with: edgemeta data fetch {dataset} --from FILE")
    os.replace(part, target)
    _record(root, {_rel(root, target): {**found, "source": source, "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})


def install_from(f: RemoteFile, given: Path, root: Path, dataset: str) -> Path:
    """`--from FILE`: verify a file the user brought, then copy it into place (atomically)."""
    if not given.is_file():
        raise DataError(f"--from {given} is not a file")
    if f.size is not None and given.stat().st_size != f.size:  # a stat, before hours of hashing a wrong file
        raise DataError(f"--from {given} is {given.stat().st_size:,} bytes; {f.name} is {f.size:,}: not the right file")
    target = f.path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    shutil.copyfile(given, part)
    _install(f, part, target, root, source=str(given), dataset=dataset)
    return target


def fetch(name: str, root: Path, *, mirrors: tuple[str, ...] = (), from_files: tuple[Path, ...] = (),
          accept_terms: bool = False, progress: Progress = SILENT, timeout: float = 30.0,
          catalog: dict[str, Dataset] = CATALOG) -> dict[str, Path]:
    """Fetch a dataset into `root` (what is already verified is kept) and build its parts.
    Returns part → path."""
    if name not in catalog:
        raise ConfigError(f"unknown dataset {name!r}; edgemeta knows {', '.join(catalog)}")
    if not (isinstance(timeout, (int, float)) and 0 < timeout <= 3600):  # NaN fails this too
        raise ConfigError(f"--timeout must be a number of seconds from 0 (exclusive) to 3600, got {timeout!r}")
    dataset = catalog[name]
    if dataset.terms and not accept_terms:
        raise ConfigError(dataset.terms)
    root.mkdir(parents=True, exist_ok=True)
    by_name = {f.name: f for f in dataset.files}
    given: dict[str, Path] = {}
    for path in from_files:
        f = by_name.get(path.name) or (dataset.files[0] if len(dataset.files) == 1 else None)
        if f is None:
            raise ConfigError(f"--from {path}: {name} needs files named {', '.join(by_name)}")
        given[f.name] = path
    ledger = read_ledger(root)
    changed = False
    for f in dataset.files:
        if f.name in given:
            install_from(f, given[f.name], root, name)
        elif _matches_ledger(root, f.path(root), ledger, f):  # in place, unchanged since its verified fetch, as pinned
            continue
        else:
            fetch_file(f, root, mirrors=mirrors, progress=progress, timeout=timeout, dataset=name)
        changed = True
    parts = {p: root / rel for p, rel in dataset.parts.items()}
    if dataset.build is not None:
        ledger = read_ledger(root)
        stale = changed or any(not _matches_ledger(root, path, ledger) for path in parts.values())
        if stale:
            progress.message(f"building {', '.join(dataset.parts.values())} from {', '.join(by_name)}")
            dataset.build(root)
            _record(root, {_rel(root, path): {**digests(path), "built_from": sorted(by_name)} for path in parts.values()})
    return parts


def _matches_ledger(root: Path, path: Path, ledger: dict, pinned: RemoteFile | None = None) -> bool:
    """The file is there with the size and sha256 the ledger recorded at its verified fetch or build
    and, for a downloaded file, the pinned checksums: pins always win over the ledger (a file the
    ledger could be edited to vouch for)."""
    entry = ledger.get(_rel(root, path))
    if not (path.is_file() and bool(entry) and path.stat().st_size == entry.get("size")):
        return False
    found = digests(path)
    return found["sha256"] == entry.get("sha256") and (pinned is None or mismatch(pinned, found) is None)


def verify(name: str, root: Path, catalog: dict[str, Dataset] = CATALOG) -> list[str]:
    """Problems with a fetched dataset (empty: every file and part matches its pinned checksums
    and the ledger)."""
    dataset = catalog[name]
    ledger = read_ledger(root)
    problems = []
    paths = {_rel(root, f.path(root)): f for f in dataset.files}
    paths.update({rel: None for rel in dataset.parts.values() if rel not in paths})
    for rel, f in paths.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing (run: edgemeta data fetch {name})")
            continue
        found = digests(path)
        why = mismatch(f, found) if f is not None else None
        entry = ledger.get(rel)
        if why is None and entry is None:
            why = "not in the ledger (it was not fetched by edgemeta)"
        elif why is None and (entry.get("sha256") != found["sha256"] or entry.get("size") != found["size"]):
            why = f"changed since it was verified on {entry.get('verified', 'its fetch')} (sha256 {found['sha256'][:16]}…, recorded {str(entry.get('sha256'))[:16]}…)"
        if why is not None:
            problems.append(f"{rel}: {why}")
    return problems
