"""Are the pretrained EfficientNet-Lite weights loaded right? Their own ImageNet-1k classifier on
real ImageNet images: Tiny ImageNet's images carry their synset (wnid), and the 1000 classes are
indexed in sorted-wnid order (tests/data/imagenet1k_wnids.txt). Tiny ImageNet images are 64×64
crops, upsampled here (bicubic) to the network's resolution, so the figure sits well below the
published ImageNet top-1 (75.1% for Lite0 at 224 on full-size images); chance is 0.1%.

    EDGEMETA_DATA=… python benchmarks/imagenet_sanity.py [--per-class 10] [--size 224] [--backbone efficientnet_lite0]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from edgemeta.runtime.preprocess import InputSpec

from edgemeta.backbones import Embedder, create_backbone, fixed_normalisation
from edgemeta.data import load_dataset
from edgemeta.pretrained import load_pretrained

WNIDS = Path(__file__).resolve().parent.parent / "tests" / "data" / "imagenet1k_wnids.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    torch.manual_seed(0)
    wnids = WNIDS.read_text().split()
    data = load_dataset(Path(os.environ["EDGEMETA_DATA"]) / "tiny-imagenet-fs.zip", 64, "RGB", "folder")
    net = create_backbone(args.backbone, 3, num_classes=1000).eval()
    provenance = load_pretrained(args.backbone, net)
    normalize = Embedder(args.backbone, InputSpec(64, 64, "RGB", *fixed_normalisation(args.backbone))).normalize
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), args.per_class, replace=False)
                          for c in range(data.n_classes)])
    truth = torch.tensor([wnids.index(data.classes[data.labels[i]]) for i in idx])
    top5 = []
    with torch.no_grad():
        for i in range(0, len(idx), 64):
            x = torch.from_numpy(data.pixels[idx[i:i + 64]]).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(x, size=args.size, mode="bicubic", align_corners=False).clamp(0, 255)
            top5.append(net.classifier(net(normalize(x))).topk(5, dim=1).indices)
    top5_t = torch.cat(top5)
    hit1 = (top5_t[:, 0] == truth).float().mean().item()
    hit5 = (top5_t == truth[:, None]).any(1).float().mean().item()
    print(json.dumps({"backbone": args.backbone, "weights": provenance, "images": len(idx), "classes": data.n_classes,
                      "size": args.size, "top1": round(100 * hit1, 2), "top5": round(100 * hit5, 2), "chance_top1": 0.1}))


if __name__ == "__main__":
    main()
