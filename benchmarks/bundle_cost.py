"""What each bundle costs on this machine, side by side: ONNX Runtime CPU milliseconds per image at
batch 1 and 32 for each bundle's fp32 graph and, where it has one, its INT8 CPU graph, all timed
interleaved in one run (noise hits every graph alike), with each bundle's backbone, input size and
the graph file's size. For choosing between backbones (Lite0 or Lite2) on a device's CPU.

    python benchmarks/bundle_cost.py BUNDLE [BUNDLE …] [--rounds 5] [--threads N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import machine, time_cpu_graphs
from edgemeta.runtime.bundle import load_bundle


def graphs(bundle) -> dict[str, Path]:
    """The bundle's fp32 graph and its INT8 CPU graph (where exported)."""
    paths = {"fp32": bundle.variant_path("fp32")}
    if "int8" in bundle.manifest["variants"]:
        paths["int8-cpu"] = bundle.variant_path("int8", cpu=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    args = ap.parse_args()
    print(f"# {machine()}; ONNX Runtime CPU provider; p50 of interleaved rounds")
    opened = {}  # (bundle folder, graph) → (bundle, graph path)
    for folder in args.bundles:
        bundle = load_bundle(folder)
        opened.update({(folder.name, variant): (bundle, path) for variant, path in graphs(bundle).items()})
    for batch in (1, 32):
        times = time_cpu_graphs(opened, batch, args.rounds, args.threads)
        print(f"batch {batch}:")
        for (name, variant), t in times.items():
            bundle, path = opened[(name, variant)]
            print(f"  {name:28s} {bundle.manifest['model']['backbone']:20s} {bundle.spec.height:>3d} px {variant:9s} "
                  f"{path.stat().st_size / 1e6:5.1f} MB  {t * 1e3 / batch:7.3f} ms/image")


if __name__ == "__main__":
    main()
