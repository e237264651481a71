"""Resolution and precision as measured choices for a globally pooled backbone (EfficientNet-Lite0):
for each input size, the checkpoint exported at that size (fp32, INT8 for TensorRT and for the CPU,
FP16), CIFAR-FS validation accuracy (5-way 1-shot / 5-shot ± 95% CI, 1,000 episodes, seed 0) through
the deployed path for fp32 and the CPU INT8 graph, FP16's parity against fp32, and ONNX Runtime
CPU milliseconds per image at batch 1 and 32 for every graph, timed interleaved in one run.

    EDGEMETA_DATA=… python benchmarks/resolution_table.py CKPT [--sizes 96,128,160,224] [--episodes 1000]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from backbones import conv_flops
from common import ROOT, machine, time_cpu_graphs
from edgemeta.export import ExportOptions, export_checkpoint
from edgemeta.runtime.bundle import load_bundle

from edgemeta.checkpoint import load_checkpoint
from edgemeta.evaluate import evaluate

SPLIT = str(ROOT / "data/splits/cifar-fs.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--sizes", default="96,128,160,224")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--data", default="cifar-fs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(f"# {machine()}; {args.checkpoint.name}; CIFAR-FS validation classes, deployed path, {args.episodes} episodes")
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp())
        ckpt = load_checkpoint(args.checkpoint).at_image_size(size)
        embedder = ckpt.build_embedder()
        row = {"size": size, "parameters": int(sum(p.numel() for p in embedder.parameters())),
               "mflop": round(conv_flops(embedder, torch.zeros(1, 3, size, size)) / 1e6, 1)}
        export_checkpoint(args.checkpoint, tmp / "b", ExportOptions(int8=True, fp16=True, calib_data=(args.data,),
                                                                   calib_images=256, image_size=size))
        bundle = load_bundle(tmp / "b")
        int8 = bundle.manifest["variants"]["int8"]
        row["int8_check"] = {"tensorrt_graph_points": int8["accuracy_delta_points"],
                             "cpu_graph_points": int8["cpu"]["accuracy_delta_points"]}
        row["fp16_parity"] = bundle.manifest["variants"]["fp16"].get("parity")
        row["cl2n"] = "centered" in bundle.manifest["output"]  # as the checkpoint records (Checkpoint.center)
        for variant in ("fp32", "int8"):
            for shot in (1, 5):
                e = evaluate(bundle=tmp / "b", variant=variant, data=[args.data], split="val", split_file=SPLIT, way=5,
                             shot=shot, episodes=args.episodes)
                row[f"{variant}_5w{shot}s"] = [round(e.result.accuracy, 2), round(e.result.ci95, 2)]
        graphs = {"fp32": bundle.variant_path("fp32"), "int8-tensorrt-graph": bundle.variant_path("int8"),
                  "int8-cpu-graph": bundle.variant_path("int8", cpu=True), "fp16": bundle.variant_path("fp16")}
        for batch in (1, 32):
            t = time_cpu_graphs({k: (bundle, path) for k, path in graphs.items()}, batch, rounds=3)
            row[f"ms_per_image_b{batch}"] = {k: round(v * 1e3 / batch, 3) for k, v in t.items()}
            row[f"int8_cpu_speedup_b{batch}"] = round(t["fp32"] / t["int8-cpu-graph"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
