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


def time_cpu_graphs(graphs: dict, batch: int, rounds: int, threads: int | None = None) -> dict:
    """p50 seconds of one call of each graph on ONNX Runtime's CPU provider, all interleaved, each on a
    batch of random pixels for its bundle's input (graphs: key → (bundle, graph path))."""
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgemeta.runtime.preprocess import pixels_to_batch
    rng, calls = np.random.default_rng(0), {}
    for key, (bundle, path) in graphs.items():
        s = bundle.spec
        x = pixels_to_batch(rng.integers(0, 256, (batch, s.height, s.width, s.channels), dtype=np.uint8))
        backend = OnnxRuntimeBackend(path, s, bundle.embedding_dim, "cpu", threads=threads)
        calls[key] = lambda b=backend, x=x: b.embed(x)
    return interleaved(calls, rounds=rounds, repeats=10 if batch == 1 else 3)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} µs"
