"""Does the fast decoding of large inputs change accuracy? (docs/benchmarks.md §9)

The Tiny ImageNet test classes (never trained on) are scaled up to large JPEGs, then decoded two
ways: the reference (full decode, one Lanczos resize) and edgemeta's (JPEG draft mode, integer
pre-shrink, then Lanczos). Both go through the same bundle and the same fixed episodes.

    EDGEMETA_DATA=… python benchmarks/large_input_accuracy.py [--side 768] [--per-class 60]
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, machine
from edgemeta.runtime import FewShotClassifier, heads
from edgemeta.runtime.preprocess import RESAMPLE, load_image
from PIL import Image

from edgemeta.data import load_dataset, select_split
from edgemeta.protocol import evaluate_episodes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=768)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--episodes", type=int, default=1000)
    args = ap.parse_args()
    from edgemeta.export import ExportOptions, export_checkpoint
    ckpt = ROOT / "checkpoints/tinyimagenet-edgenet-pretrain.safetensors"
    bundle = Path(tempfile.mkdtemp()) / "bundle"
    export_checkpoint(ckpt, bundle, ExportOptions(calib_images=64))
    clf = FewShotClassifier.load(bundle, backend="onnxruntime")
    spec = clf.bundle.spec
    data = load_dataset(["tiny-imagenet-fs.zip"], 64, "RGB", "folder")
    test = select_split(data, "test", split_file=str(ROOT / "data/splits/tiny-imagenet-fs.json"))
    keep = np.concatenate([idx[:args.per_class] for idx in test.class_indices()])
    reference, fast = [], []
    for i in keep:
        big = Image.fromarray(test.pixels[i]).resize((args.side, args.side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=90)
        jpeg = buf.getvalue()
        full = Image.open(io.BytesIO(jpeg))
        full.load()
        reference.append(np.asarray(full.convert("RGB").resize((spec.width, spec.height), RESAMPLE)))
        fast.append(load_image(jpeg, spec))
    labels = test.labels[keep]
    ref_px, fast_px = np.stack(reference), np.stack(fast)
    print(f"# {machine()}; {len(keep)} test images of {test.n_classes} classes scaled to {args.side}² JPEG (q90)")
    print(f"mean |fast − reference| = {np.abs(fast_px.astype(int) - ref_px).mean():.3f} grey levels")
    head = clf.bundle.head
    fn = lambda s, y, q, n: heads.head_logits(head, s, y, q, n)  # noqa: E731
    for shot in (1, 5):
        r = evaluate_episodes(clf.embed(ref_px), labels, fn, 5, shot, 15, args.episodes, 0)
        f = evaluate_episodes(clf.embed(fast_px), labels, fn, 5, shot, 15, args.episodes, 0)
        print(f"5-way {shot}-shot: reference {r.accuracy:.2f} ± {r.ci95:.2f}, fast {f.accuracy:.2f} ± {f.ci95:.2f}, "
              f"difference {f.accuracy - r.accuracy:+.2f} points (same {args.episodes} episodes)")


if __name__ == "__main__":
    main()
