"""Latency on this device, per stage and per adaptation step: embed, head fit (prototype, ridge,
each logistic SGD step), enrollment end to end, prediction end to end; p50/p90/p99, peak memory,
environment. NumPy + the bundle's backend only, like everything in the runtime."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import heads
from .backends import open_backend
from .bundle import Bundle, load_bundle
from .classifier import FewShotClassifier
from .device_info import cpu_model, tensorrt_version
from .heads import resolve_head
from .preprocess import ImageSource, load_images, pixels_to_batch
from .progress import SILENT, Progress
from .timing import summarize, time_call

BENCH_SCHEMA = "edgemeta-bench"
BENCH_VERSION = "1.0"


def environment(backend) -> dict:
    import onnxruntime as ort
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
           "cores": os.cpu_count(), "onnxruntime_version": ort.__version__,
           "available_providers": ort.get_available_providers(), "numpy_version": np.__version__,
           **backend.describe()}
    env["tensorrt_version"] = tensorrt_version()
    model = Path("/proc/device-tree/model")
    if model.exists():  # Jetson: board model and power mode
        env["jetson_model"] = model.read_bytes().rstrip(b"\x00").decode(errors="replace")
        try:
            env["power_mode"] = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["power_mode"] = None
    return env


def _episode_features(rng: np.random.Generator, pool: np.ndarray, way: int, shot: int) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.choice(len(pool), way * shot, replace=len(pool) < way * shot)
    return np.ascontiguousarray(pool[idx]), np.repeat(np.arange(way), shot)


def bench_heads(features: np.ndarray, ways: list[int], shots: list[int], steps: list[int], head_names: list[str],
                repeat: int, logistic: heads.HeadConfig) -> tuple[list[dict], list[dict]]:
    """Head fit latency per way/shot, and the latency of each logistic SGD step."""
    rng = np.random.default_rng(0)
    fits, step_rows = [], []
    for way in ways:
        for shot in shots:
            s, y = _episode_features(rng, features, way, shot)
            for name in head_names:  # every closed-form head's fit, as the device runs it (registry)
                if name != "logistic":
                    head = heads.HeadConfig(kind=name)
                    fits.append({"head": name, "way": way, "shot": shot,
                                 **summarize(time_call(lambda: heads.fit(head, s, y, way), repeat))})
            if "logistic" in head_names:
                for k in steps:
                    per_step: list[float] = []
                    totals: list[float] = []
                    for _ in range(max(3, repeat // max(1, k // 5))):
                        start, marks = time.perf_counter(), []
                        heads.logistic_fit(s, y, way, k, logistic.lr, momentum=logistic.momentum,
                                           on_step=lambda _i: marks.append(time.perf_counter()))
                        per_step.extend(np.diff(marks))  # marks[0]: the set-up (imprinting, buffers) is done
                        totals.append(marks[-1] - start)
                    step_rows.append({"head": "logistic", "way": way, "shot": shot, "steps": k, "timed_steps": k,
                                      "per_step": summarize(per_step), "total": summarize(totals)})
    return fits, step_rows


def run_bench(bundle: str | Path | Bundle, images: Sequence[ImageSource], backend: str = "auto", variant: str = "fp32",
              ways: Sequence[int] = (5,), shots: Sequence[int] = (1, 5), steps: Sequence[int] = (1, 10, 50),
              head_names: Sequence[str] | None = None, batches: Sequence[int] = (1, 8, 32),
              repeat: int = 50, warmup: int = 5, progress: Progress = SILENT) -> dict:
    """Measure everything; `images` are encoded image files (PNG/JPEG bytes) to decode and embed.
    head_names: the heads to fit (default: every registered head)."""
    if head_names is None:
        from .heads import head_names as registered
        head_names = registered()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    tick = progress.message
    be = open_backend(b, backend, variant)
    spec = b.spec
    pixels = load_images(images[: max(batches) * 2], spec)
    while len(pixels) < max(batches):
        pixels = np.concatenate([pixels, pixels])
    result: dict[str, Any] = {"schema": BENCH_SCHEMA, "schema_version": BENCH_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(be),
              "bundle": {"path": str(b.path), "backbone": b.manifest["model"]["backbone"], "variant": variant,
                         "embedding_dim": b.embedding_dim, "input": [spec.channels, spec.height, spec.width]},
              "config": {"ways": list(ways), "shots": list(shots), "steps": list(steps), "heads": list(head_names),
                         "batches": list(batches), "repeat": repeat, "warmup": warmup}}
    tick("embedding")
    result["embed"] = []
    for batch in batches:
        x = pixels_to_batch(pixels[:batch])
        s = summarize(time_call(lambda: be.embed(x), repeat, warmup))
        result["embed"].append({"batch": batch, **s, "images_per_s": batch / (s["p50_ms"] / 1e3)})
    tick("head fits")
    features = be.embed_pixels(pixels)
    logistic = resolve_head(b.head, "logistic")
    result["head_fit"], result["logistic_steps"] = bench_heads(features, list(ways), list(shots), list(steps),
                                                               list(head_names), repeat, logistic)
    tick("enrollment and prediction")
    clf = FewShotClassifier(b, be, resolve_head(b.head, None))
    result["enroll"] = []
    for shot in shots:
        shot_images = [images[i % len(images)] for i in range(shot)]
        counter = iter(range(10 ** 9))
        runs = time_call(lambda: clf.enroll(f"{shot}-shot-{next(counter)}", shot_images), max(5, repeat // 5), 1)
        s = summarize(runs)
        result["enroll"].append({"shot": shot, **s, "per_shot_p50_ms": s["p50_ms"] / shot})
    result["predict"] = []
    for batch in sorted({1, max(batches)}):
        q = [images[i % len(images)] for i in range(batch)]
        result["predict"].append({"batch": batch, **summarize(time_call(lambda: clf.predict(q), max(5, repeat // 5), 1))})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    be.close()
    return result


def run_frozen_bench(bundle: str | Path | Bundle, images: Sequence[ImageSource], batches: Sequence[int] = (1, 8, 32),
                     repeat: int = 50, warmup: int = 5, progress: Progress = SILENT) -> dict:
    """A frozen classifier (`edgemeta freeze`): its graph (backbone + head in one call) on decoded
    pixels, and `predict` end to end (decode + graph), per batch size. Nothing to fit or enroll."""
    from .frozen import FrozenClassifier
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    clf = FrozenClassifier(b)
    spec = b.spec
    pixels = load_images(list(images[: max(batches) * 2]), spec)
    while len(pixels) < max(batches):
        pixels = np.concatenate([pixels, pixels])

    ran = clf.backend
    result: dict[str, Any] = {"schema": BENCH_SCHEMA, "schema_version": BENCH_VERSION,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "environment": environment(ran),
                              "bundle": {"path": str(b.path), "backbone": b.manifest["model"]["backbone"], "variant": "frozen",
                                         "classes": len(clf.labels), "input": [spec.channels, spec.height, spec.width]},
                              "config": {"batches": list(batches), "repeat": repeat, "warmup": warmup},
                              "embed": [], "head_fit": [], "logistic_steps": [], "enroll": [], "graph": [], "predict": []}
    progress.message("frozen graph")
    for batch in batches:
        x = pixels[:batch]
        s = summarize(time_call(lambda: clf.run(x), repeat, warmup))
        result["graph"].append({"batch": batch, **s, "images_per_s": batch / (s["p50_ms"] / 1e3)})
    progress.message("predict (decode + graph)")
    for batch in batches:
        q = [images[i % len(images)] for i in range(batch)]
        result["predict"].append({"batch": batch, **summarize(time_call(lambda: clf.predict(q), max(5, repeat // 5), 1))})
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def validate_bench(result: dict) -> None:
    """Check a bench JSON has the schema and every stage (used by tests and by readers)."""
    if result.get("schema") != BENCH_SCHEMA or str(result.get("schema_version", "")).split(".")[0] != BENCH_VERSION.split(".")[0]:
        raise ValueError("not an edgemeta bench result of a known version")
    for key in ("environment", "bundle", "config", "embed", "head_fit", "logistic_steps", "enroll", "predict", "peak_rss_mb"):
        if key not in result:
            raise ValueError(f"bench result lacks {key!r}")


def render_plot(result: dict, path: str | Path) -> None:
    """PNG: p50 latency per stage (p99 as whiskers), and latency vs logistic adaptation steps."""
    from .extras import load
    load("matplotlib", "--plot").use("Agg")
    import matplotlib.pyplot as plt
    stages = ([(f"embed b{r['batch']}", r) for r in result["embed"]]
              + [(f"{r['head']} fit {r['way']}w{r['shot']}s", r) for r in result["head_fit"]]
              + [(f"enroll {r['shot']}-shot", r) for r in result["enroll"]]
              + [(f"frozen graph b{r['batch']}", r) for r in result.get("graph", [])]
              + [(f"predict b{r['batch']}", r) for r in result["predict"]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1.4, 1]})
    names = [n for n, _ in stages]
    p50 = np.array([r["p50_ms"] for _, r in stages])
    p99 = np.array([r["p99_ms"] for _, r in stages])
    ax1.barh(names, p50, xerr=[np.zeros_like(p50), p99 - p50], color="#4C72B0", capsize=3)
    ax1.set_xscale("log")
    ax1.invert_yaxis()
    ax1.set_xlabel("latency, ms (bar p50, whisker p99; log scale)")
    ax1.set_title("latency per stage")
    for i, v in enumerate(p50):
        ax1.text(p99[i], i, f"  {v:.3g} ms", va="center", fontsize=8)
    for way in sorted({r["way"] for r in result["logistic_steps"]}):
        for shot in sorted({r["shot"] for r in result["logistic_steps"]}):
            rows = sorted((r for r in result["logistic_steps"] if r["way"] == way and r["shot"] == shot), key=lambda r: r["steps"])
            if rows:
                ax2.plot([r["steps"] for r in rows], [r["total"]["p50_ms"] for r in rows], marker="o",
                         label=f"{way}-way {shot}-shot (per step {np.median([r['per_step']['p50_ms'] for r in rows]) * 1e3:.0f} µs)")
    ax2.set_xlabel("logistic head SGD steps")
    ax2.set_ylabel("head fit latency p50, ms")
    ax2.set_title("latency vs adaptation steps")
    ax2.grid(alpha=0.3)
    if result["logistic_steps"]:
        ax2.legend(fontsize=8)
    else:  # a frozen classifier fits nothing on the device
        ax2.text(0.5, 0.5, "no adaptation on the device\n(frozen classifier)", ha="center", va="center",
                 transform=ax2.transAxes)
    env = result["environment"]
    fig.suptitle(f"edgemeta bench — {result['bundle']['backbone']} {result['bundle']['variant']} on {env.get('backend')} "
                 f"({env.get('cpu')}, {env.get('cores')} cores)", fontsize=10)
    fig.tight_layout()
    from .files import atomic_write
    try:  # the mark edgemeta.cli.common.PLOT_MARK reads; written whole or not at all
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": "edgemeta bench"}))
    finally:
        plt.close(fig)
