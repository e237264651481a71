"""One training step (forward + backward of the algorithm's loss) in three backbone set-ups, side
by side in one run: the literature's (NCHW activations, ReLU before max-pool), NHWC activations
(channels-last, the CPU default of `edgemeta train`), and NHWC with max-pool before the activation
(edgemeta's Conv4/ResNet-12 default; EdgeNet has no max-pool). For the shipped training recipes:
Omniglot Conv4 ProtoNet (30-way 5-shot 5-query, 28×28 grey) and supervised pre-training on 64×64
colour images (batch 64) for each backbone. Also checks that the set-ups give the same loss. The
process keeps its freed memory, as `edgemeta train` does.

    python benchmarks/layout_speed.py [--threads 2]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import interleaved, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from edgemeta.runtime import InputSpec
    from edgemeta.runtime.malloc import retain_freed_memory

    from edgemeta.algorithms import Pretrain, ProtoNet
    from edgemeta.backbones import Embedder, deployment_args
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    g = torch.Generator().manual_seed(0)
    grey = InputSpec(28, 28, "L", (0.92,), (0.24,))
    rgb = InputSpec(64, 64, "RGB", (0.48, 0.45, 0.40), (0.27, 0.26, 0.28))
    way, shot, query = 30, 5, 5
    sx = torch.rand(way * shot, 1, 28, 28, generator=g) * 255
    qx = torch.rand(way * query, 1, 28, 28, generator=g) * 255
    sy, qy = torch.arange(way).repeat_interleave(shot), torch.arange(way).repeat_interleave(query)
    x_rgb, y_rgb = torch.rand(64, 3, 64, 64, generator=g) * 255, torch.randint(0, 100, (64,), generator=g)
    recipes = {
        "conv4 protonet 30w5s5q 28px": ("conv4", {}, grey, "protonet"),
        "conv4 pretrain b64 64px": ("conv4", {}, rgb, "pretrain"),
        "edgenet pretrain b64 64px": ("edgenet", {}, rgb, "pretrain"),
        "resnet12(32-256) pretrain b64 64px": ("resnet12", {"widths": [32, 64, 128, 256]}, rgb, "pretrain"),
    }
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads; one training step "
          "(forward + backward), p50")
    print(f"{'recipe':>36} | {'NCHW':>9} | {'NHWC':>9} | {'NHWC+pool':>9} | NCHW/NHWC | NCHW/NHWC+pool | "
          "loss difference")
    setups = {"nchw": (False, False), "nhwc": (True, False), "nhwc_pool": (True, True)}
    for label, (backbone, bargs, spec, algo) in recipes.items():
        def make(channels_last, pool_first):
            torch.manual_seed(0)
            # pool first is the backbones' default; deployment_args gives the literature's order
            args_ = bargs if pool_first else deployment_args(backbone, bargs)
            embedder = Embedder(backbone, spec, args_, channels_last=channels_last)
            return ProtoNet(embedder) if algo == "protonet" else Pretrain(embedder, 100)

        def step_fn(model):
            def step():
                model.zero_grad()
                logits = model(sx, sy, qx, way) if algo == "protonet" else model(x_rgb)
                loss = F.cross_entropy(logits, qy if algo == "protonet" else y_rgb)
                loss.backward()
                return loss.item()
            return step
        steps = {k: step_fn(make(*v)) for k, v in setups.items()}
        losses = [steps[k]() for k in setups]
        difference = max(losses) - min(losses)
        t = interleaved(steps, rounds=3, repeats=4, warmup=1)
        print(f"{label:>36} | {t['nchw'] * 1e3:>6.1f} ms | {t['nhwc'] * 1e3:>6.1f} ms | {t['nhwc_pool'] * 1e3:>6.1f} ms | "
              f"{t['nchw'] / t['nhwc']:>8.2f}× | {t['nchw'] / t['nhwc_pool']:>13.2f}× | {difference:.1e}")

if __name__ == "__main__":
    main()
