"""glibc's allocator, tuned for two kinds of process: training keeps its freed memory, the
service gives it back.

Training: keep freed heap memory instead of handing it back to the OS.

glibc serves large blocks (a few-shot batch's activations are 1–70 MB) with fresh mmap()s and
returns them on free, or trims the heap top, so the next step page-faults its way through the same
megabytes again: up to 16,000 minor faults and ~40% of a CPU meta-training step in a fresh process
(see docs/benchmarks.md §6). Turning off mmap for allocations and the trimming makes the process
reuse its own freed pages. The cost: the resident size stays at its peak until the process ends,
which is what a training process does anyway. `edgemeta.train.train` and `edgemeta eval` on a
checkpoint (torch) call it; the device runtime does not need it (ONNX Runtime keeps its own arena).

Service: `return_freed_memory` fixes glibc's mmap threshold at 1 MiB. By default the threshold
rises (up to 32 MiB) after large blocks are freed, so a decoded 40 MP image's Pillow blocks
(16 MiB each) land in per-thread heap arenas afterwards and stay there: 3.9 GB was still held after
eight such requests had been answered. With a fixed threshold every large block is an mmap,
returned to the OS when it is freed."""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters from glibc's <malloc.h>
_NEVER = 2**31 - 1


def _mallopt():
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory; True if it took, False where there is no glibc
    mallopt (macOS, musl), which leaves the allocator as it was."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned on free."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def trim_freed_memory() -> bool:
    """Hand the free pages of every heap arena back to the OS now (glibc's malloc_trim): what a
    service calls once a large request body is gone, whose many small chunks the mmap threshold
    does not cover. False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return False
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
