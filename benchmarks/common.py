"""Shared helpers for the side-by-side benchmarks (not part of `make test`)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHIPPED_DATA = [ROOT / "data/omniglot/images_background_small1.zip", ROOT / "data/omniglot/images_background_small2.zip"]


def machine() -> str:
    from edgemeta.runtime.device_info import cpu_model
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def interleaved(fns: dict, rounds: int = 5, repeats: int = 20, warmup: int = 3) -> dict:
    """p50 seconds of each function, measured in interleaved rounds so noise hits all alike."""
    from edgemeta.runtime.timing import time_call
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].extend(time_call(fn, repeats, warmup))
    return {k: float(np.median(v)) for k, v in samples.items()}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} µs"
