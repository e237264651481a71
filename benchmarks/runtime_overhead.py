"""The runtime's fixed cost per call: `FewShotClassifier.embed` on uint8 pixels and `predict` on
pixels, against a bare `session.run` on the model's float32 NCHW input, batch 1 and 32 (p50 of
calls interleaved one by one). --before PYTHON runs the same measurement with another edgemeta installation
(an earlier commit in its own venv) in alternating processes, for a side-by-side before/after.

    python benchmarks/runtime_overhead.py BUNDLE [--rounds 5] [--before /tmp/venv-before/bin/python]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine

MEASURE = r"""
import json, sys, time
import numpy as np
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.preprocess import pixels_to_batch
clf = FewShotClassifier.load(sys.argv[1], backend="onnxruntime")
spec = clf.bundle.spec
rng = np.random.default_rng(0)
for c in range(5):
    clf.enroll(f"class{c}", rng.integers(0, 256, (2, spec.height, spec.width, spec.channels), dtype=np.uint8))
session = clf.backend.session
name = session.get_inputs()[0].name
out = {}
for batch in (1, 32):
    pixels = rng.integers(0, 256, (batch, spec.height, spec.width, spec.channels), dtype=np.uint8)
    x = pixels_to_batch(pixels)
    fns = {"session.run": lambda: session.run(None, {name: x}), "embed": lambda: clf.embed(pixels),
           "predict": lambda: clf.predict(pixels)}
    for f in fns.values():  # warm-up
        for _ in range(5):
            f()
    times = {k: [] for k in fns}
    for _ in range(400 if batch == 1 else 40):  # one call of each in turn: drift hits all three alike
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    out[batch] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
print(json.dumps(out))
"""


def run(python: str, bundle: str) -> dict:
    import tempfile
    text = subprocess.run([python, "-c", MEASURE, bundle], check=True, capture_output=True, text=True,
                          cwd=tempfile.gettempdir()).stdout  # not the source tree: each python its own edgemeta
    return json.loads(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before")
    args = ap.parse_args()
    pythons = {"now": sys.executable, **({"before": args.before} if args.before else {})}
    results: dict[str, list[dict]] = {k: [] for k in pythons}
    for _ in range(args.rounds):
        for k, py in pythons.items():
            results[k].append(run(py, str(Path(args.bundle).resolve())))
    print(f"machine: {machine()}; {args.bundle}; median of {args.rounds} alternating processes, p50 per call")
    for k in pythons:
        for batch in ("1", "32"):
            m = {f: statistics.median(r[batch][f] for r in results[k]) for f in ("session.run", "embed", "predict")}
            print(f"  {k:6s} batch {batch:>2}: session.run {m['session.run'] * 1e3:.3f} ms, embed {m['embed'] * 1e3:.3f} ms "
                  f"({m['embed'] / m['session.run']:.3f}×), predict {m['predict'] * 1e3:.3f} ms "
                  f"({m['predict'] / m['session.run']:.3f}×)")



if __name__ == "__main__":
    main()
