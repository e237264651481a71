"""Latency measurement: warm-up, repeats, percentiles. Used by export reports and `edgemeta bench`."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_call(fn: Callable[[], object], repeats: int = 50, warmup: int = 5) -> np.ndarray:
    """Seconds per call of fn over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def summarize(seconds: np.ndarray | list[float]) -> dict:
    """p50 / p90 / p99 / mean in milliseconds, and the sample count."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": int(ms.size)}
