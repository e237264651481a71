"""`--variant auto`: the fastest of the bundle's ONNX graphs on this machine, never one slower than
fp32 nor one whose recorded accuracy cost is over a point.

Which graph is fastest depends on the machine (the TensorRT-shaped S8S8 INT8 graph runs at 0.5–0.7×
fp32 on ONNX Runtime's CPU provider; FP16 is slow on CPUs), so it is measured once per machine and
recorded beside the bundle (`.variant-choice.json`, or the user's cache when the bundle folder is
read-only), keyed by the bundle's model, the CPU, the providers and the ONNX Runtime version, like
an engine's device identity. Later runs read the record.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .files import atomic_write, user_cache

RECORD = ".variant-choice.json"
MAX_ACCURACY_COST_POINTS = 1.0


def record_key(bundle: Bundle, providers: list[str]) -> str:
    from .device_info import machine_key
    return machine_key(bundle.model_sha256, ",".join(providers), str(os.cpu_count()))


def _records(bundle: Bundle) -> list[Path]:
    return [bundle.path / RECORD, user_cache("variant-choice") / f"{bundle.model_sha256[:16]}.json"]


def candidates(bundle: Bundle) -> list[str]:
    """The variants `auto` may pick: fp32, and the others unless their recorded accuracy cost is over
    MAX_ACCURACY_COST_POINTS."""
    out = []
    for name, entry in bundle.manifest["variants"].items():
        cost = (entry.get("cpu") or entry).get("accuracy_delta_points", 0.0)
        if name == "fp32" or cost is None or cost >= -MAX_ACCURACY_COST_POINTS:
            out.append(name)
    return out


def measure_ms(path: Path, bundle: Bundle, providers: list[str], runs: int = 30) -> float:
    """Median milliseconds of one batch-1 call of the graph at `path` (after warm-up)."""
    from .backends.onnxruntime import OnnxRuntimeBackend
    backend = OnnxRuntimeBackend(path, bundle.spec, bundle.embedding_dim, providers)
    x = np.random.default_rng(0).uniform(0, 255, (1, bundle.spec.channels, bundle.spec.height, bundle.spec.width))
    x = x.astype(np.float32)
    for _ in range(5):
        backend.embed(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.embed(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def choose_variant(bundle: Bundle, providers: list[str], measure: Callable[[Path], float] | None = None) -> str:
    """The recorded choice for this machine, else measure every candidate once, record, and choose:
    the fastest, and fp32 unless another is faster."""
    key = record_key(bundle, providers)
    for path in _records(bundle):
        try:
            record = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("choice") in bundle.manifest["variants"]:
            return str(record["choice"])
    on_cpu = providers == ["CPUExecutionProvider"]
    timed = measure or (lambda p: measure_ms(p, bundle, providers))
    ms = {v: timed(bundle.variant_path(v, cpu=on_cpu)) for v in candidates(bundle)}
    choice = min(ms, key=lambda v: (ms[v], v != "fp32"))
    if ms[choice] > ms["fp32"]:
        choice = "fp32"
    entry = {"choice": choice, "ms_batch1": {k: round(v, 4) for k, v in ms.items()}, "providers": providers,
             "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for path in _records(bundle):  # beside the bundle if it is writable, else the user's cache
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            existing = json.loads(path.read_text()) if path.exists() else {}
            atomic_write(path, (json.dumps({**existing, key: entry}, indent=1) + "\n").encode(), durable=False)
            break
        except (OSError, ValueError):
            continue
    return choice
