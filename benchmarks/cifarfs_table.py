"""The README's CIFAR-FS rows, through the deployed path (ONNX Runtime + the NumPy head) on the 16
validation classes: for each checkpoint, 5-way 1-shot and 5-shot ± 95% CI with the plain embedding,
with CL2N (export --center), and with flipped shots; the ridge and logistic heads on the best of
those; parameters, MFLOP per image, ms per image at batch 1 and 32.

    EDGEMETA_DATA=… python benchmarks/cifarfs_table.py CKPT [CKPT …] [--episodes 1000] [--out table.jsonl]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from backbones import conv_flops
from common import ROOT, interleaved, machine
from edgemeta.export import ExportOptions, export_checkpoint
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.preprocess import pixels_to_batch

from edgemeta.checkpoint import load_checkpoint
from edgemeta.evaluate import evaluate

SPLIT = str(ROOT / "data/splits/cifar-fs.json")
DATA = ["cifar-fs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print(f"# {machine()}; CIFAR-FS validation classes, deployed path, {args.episodes} episodes (seed 0)")
    rows = []
    for ckpt_path in args.checkpoints:
        ckpt = load_checkpoint(ckpt_path)
        tmp = Path(tempfile.mkdtemp())
        import torch
        embedder = ckpt.build_embedder()
        flops = conv_flops(embedder, torch.zeros(1, 3, 32, 32))
        params = int(sum(p.numel() for p in embedder.parameters()))
        bundles = {"plain": ExportOptions(center=False, calib_images=64), "cl2n": ExportOptions(center=True, calib_images=64)}
        for name, options in bundles.items():
            export_checkpoint(ckpt_path, tmp / name, options)
        for name in bundles:
            for flip in (False, True):
                for head in (["default", "ridge", "logistic"] if name == "cl2n" and flip else ["default"]):
                    row = {"checkpoint": ckpt_path.name, "backbone": ckpt.meta["backbone"]["name"], "features": name,
                           "flip_shots": flip, "head": head, "parameters": params, "mflop": round(flops / 1e6, 1)}
                    for shot in (1, 5):
                        e = evaluate(bundle=tmp / name, data=DATA, split="val", split_file=SPLIT, way=5, shot=shot,
                                     episodes=args.episodes, head=head, flip_shots=flip)
                        row[f"5w{shot}s"] = [round(e.result.accuracy, 2), round(e.result.ci95, 2)]
                        row["head_config"] = e.head
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        clf = FewShotClassifier.load(tmp / "cl2n", backend="onnxruntime")
        session, name = clf.backend.session, clf.backend.session.get_inputs()[0].name
        speed = {}
        for batch in (1, 32):
            x = pixels_to_batch(np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
            speed[f"ms_b{batch}"] = round(interleaved({"run": lambda: session.run(None, {name: x})},
                                                      rounds=3, repeats=20)["run"] * 1e3 / batch, 4)
        print(json.dumps({"checkpoint": ckpt_path.name, "ms_per_image": speed}), flush=True)
        rows.append({"checkpoint": ckpt_path.name, "ms_per_image": speed})
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
