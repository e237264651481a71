"""What each bundle costs on this machine, side by side: ONNX Runtime CPU milliseconds per image at
batch 1 and 32 for each bundle's fp32 graph and, where it has one, its INT8 CPU graph, all timed
interleaved in one run (noise hits every graph alike), with each bundle's backbone, input size and
the graph file's size. For choosing between backbones (Lite0 or Lite2) on a device's CPU.

    python benchmarks/bundle_cost.py BUNDLE [BUNDLE …] [--rounds 5] [--threads N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import interleaved, machine
from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemeta.runtime.bundle import load_bundle
from edgemeta.runtime.preprocess import pixels_to_batch


def graphs(folder: Path, threads: int | None) -> dict[str, OnnxRuntimeBackend]:
    """The bundle's fp32 graph and its INT8 CPU graph (where exported), opened on the CPU provider."""
    bundle = load_bundle(folder)
    paths = {"fp32": bundle.variant_path("fp32")}
    if "int8" in bundle.manifest["variants"]:
        paths["int8-cpu"] = bundle.variant_path("int8", cpu=True)
    return {k: OnnxRuntimeBackend(p, bundle.spec, bundle.embedding_dim, "cpu", threads=threads) for k, p in paths.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    args = ap.parse_args()
    print(f"# {machine()}; ONNX Runtime CPU provider; p50 of interleaved rounds")
    opened = {}
    for folder in args.bundles:
        bundle = load_bundle(folder)
        model = bundle.manifest["model"]
        for variant, backend in graphs(folder, args.threads).items():
            opened[(folder.name, variant)] = (bundle.spec, backend, model["backbone"], backend.model_path.stat().st_size)
    for batch in (1, 32):
        rng = np.random.default_rng(0)
        inputs = {k: pixels_to_batch(rng.integers(0, 256, (batch, s.height, s.width, s.channels), dtype=np.uint8))
                  for k, (s, *_rest) in opened.items()}
        times = interleaved({k: (lambda b=b, x=inputs[k]: b.embed(x)) for k, (_s, b, *_r) in opened.items()},
                            rounds=args.rounds, repeats=10 if batch == 1 else 3)
        print(f"batch {batch}:")
        for (name, variant), t in times.items():
            spec, _b, backbone, size = opened[(name, variant)]
            print(f"  {name:28s} {backbone:20s} {spec.height:>3d} px {variant:9s} {size / 1e6:5.1f} MB  "
                  f"{t * 1e3 / batch:7.3f} ms/image")


if __name__ == "__main__":
    main()
