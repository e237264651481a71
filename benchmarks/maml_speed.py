"""Episodes per second of edgemeta's meta-training step against a straightforward per-task loop
that clones the model (the way learn2learn's MAML.clone()/adapt() works), same backbone, data and
episode shape, measured side by side in one run.

Columns: edgemeta as it trains on the CPU by default (functional task loop, NHWC activations,
Conv4 pooling before its ReLU, second-order support pass in NCHW) in float32 and with
`--precision bf16` (bfloat16 autocast); edgemeta with the tasks vectorised (vmap / one batch);
the clone loop on the literature's Conv4 (ReLU then pool) in the stock NCHW layout (what a
learn2learn user runs), in float32 and under the same bf16 autocast (what that user would get
from the one-line change); and the clone loop on edgemeta's backbone set-up (NHWC, pool first),
to show how much of the difference is the backbone set-up rather than the loop.

The ceilings: the episode's convolution and matmul FLOPs (torch's FlopCounterMode) at the rate
this CPU runs the step's dominant convolution (64→64 3×3 at 14×14, NHWC) in isolation, in float32
and in bfloat16, with every memory-bound pass (BatchNorm, pooling, ReLU) free — what no
implementation of the same arithmetic in that precision can beat, as a multiple of the clone loop.
They are printed after the table, with the convolution's rate measured before and after it (the
faster of the two: a rate caught during a burst of load elsewhere on the machine would understate
them).

The process keeps its freed memory as `edgemeta train` does (edgemeta.runtime.malloc), for every column:
otherwise glibc's page faults depend on what ran before in the process and move the columns
against each other.

--backbone picks any registered backbone (default conv4); the clone loop then runs it in the
literature's order (ReLU before pooling where the backbone has pool_first) in NCHW. The ceilings
use Conv4's dominant convolution's rate whatever the backbone (about the cores' FMA limit: an
upper bound on any backbone's FLOP rate, a loose one for depthwise convolutions).

    python benchmarks/maml_speed.py [--meta-batch 4,8] [--way 5] [--shot 1] [--query 15] [--steps 1]
                                    [--backbone conv4|resnet12|edgenet]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from common import SHIPPED_DATA, interleaved, machine


def clone_module(module: torch.nn.Module) -> torch.nn.Module:
    """learn2learn-style clone: a copy whose parameters are differentiable clones of the originals."""
    clone = copy.deepcopy(module)
    for (_, m), (_, src) in zip(clone.named_modules(), module.named_modules()):
        for pname, p in src._parameters.items():
            if p is not None:
                m._parameters[pname] = p.clone()
    return clone


def update_module(module: torch.nn.Module, grads: dict, lr: float) -> None:
    for name, m in module.named_modules():
        for pname in list(m._parameters):
            key = f"{name}.{pname}" if name else pname
            if key in grads:
                m._parameters[pname] = m._parameters[pname] - lr * grads[key]


def loop_meta_step(model, sx, sy, qx, qy, steps: int, lr: float, first_order: bool, anil: bool):
    """Per task: clone, adapt with autograd.grad, score the query, backward."""
    total = 0.0
    for t in range(sx.shape[0]):
        learner = clone_module(model)
        for _ in range(steps):
            names = [n for n, p in learner.named_parameters()
                     if p.requires_grad and not n.startswith("inner_log_lr") and (not anil or n.startswith("head."))]
            params = [dict(learner.named_parameters())[n] for n in names]
            loss = F.cross_entropy(learner(sx[t]), sy)
            grads = torch.autograd.grad(loss, params, create_graph=not first_order)
            update_module(learner, dict(zip(names, grads)), lr)
        q_loss = F.cross_entropy(learner(qx[t]), qy) / sx.shape[0]
        q_loss.backward()
        total += q_loss.item()
    return total


def conv_flops_per_second(dtype: torch.dtype = torch.float32, repeats: int = 90) -> float:
    """Rate of the Conv4 step's dominant convolution (75 images, 64→64, 3×3, 14×14, NHWC) in
    `dtype`: the fastest of three blocks of repeats/3 calls."""
    from edgemeta.runtime.timing import time_call
    x = torch.randn(75, 64, 14, 14, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    best = float(time_call(lambda: torch.conv2d(x, w, padding=1), repeats, warmup=3).reshape(3, -1).mean(1).min())
    return 2 * 75 * 14 * 14 * 64 * 64 * 9 / best


def flops_per_episode(model, sx, sy, qx, qy) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.zero_grad()
        model.meta_step(sx, sy, qx, qy)
    return counter.get_total_flops() / sx.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-batch", default="4,8")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--algorithms", default="fomaml,maml,anil")
    ap.add_argument("--backbone", default="conv4")
    args = ap.parse_args()
    from edgemeta.backbones import list_backbones
    if args.backbone not in list_backbones():
        ap.error(f"--backbone: choose one of {', '.join(list_backbones())}")
    from edgemeta.runtime import InputSpec, pixels_to_batch
    from edgemeta.runtime.malloc import retain_freed_memory

    from edgemeta.algorithms import ANIL, MAML
    from edgemeta.algorithms.batchnorm import use_batch_statistics
    from edgemeta.backbones import Embedder, deployment_args
    from edgemeta.data import EpisodeSampler, load_dataset
    from edgemeta.data.episodes import stack_tasks
    from edgemeta.precision import autocast, native_bf16
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory()
    rates = [(conv_flops_per_second(), conv_flops_per_second(torch.bfloat16))]
    data = load_dataset(SHIPPED_DATA, 28)
    sampler = EpisodeSampler(data.labels, args.way, args.shot, args.query, seed=0)
    spec = InputSpec(28, 28, "L", (0.92,), (0.24,))
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads; {args.backbone} 28×28, "
          f"{args.way}-way {args.shot}-shot {args.query}-query, {args.steps} inner step(s); freed memory retained: "
          f"{retained}; native bf16: {native_bf16('cpu')}")
    columns = ("edgemeta", "edgemeta bf16", "vectorised", "clone", "clone bf16", "clone, edgemeta backbone")
    ratios = (("edgemeta", "clone"), ("edgemeta bf16", "clone"), ("edgemeta bf16", "clone bf16"),
              ("vectorised", "clone"), ("clone, edgemeta backbone", "clone"))
    print("episodes/s: " + " | ".join(columns) + "; ratios: " + " | ".join(f"{a}/{b}" for a, b in ratios)
          + "; GFLOP/episode")
    ceilings = []
    for mb in [int(v) for v in args.meta_batch.split(",")]:
        episodes = sampler.episodes(mb)
        sx, sy, qx, qy = stack_tasks(episodes, lambda idx: torch.from_numpy(pixels_to_batch(data.pixels[idx])))
        for name in args.algorithms.split(","):
            def make(vectorize):
                torch.manual_seed(0)
                embedder = Embedder(args.backbone, spec, channels_last=True)
                if name == "anil":
                    return ANIL(embedder, args.steps, 0.4, vectorize=vectorize)
                return MAML(embedder, args.way, args.steps, 0.4, first_order=name == "fomaml", vectorize=vectorize)

            def baseline(edgemeta_backbone):
                # a linear head on the backbone (for ANIL only the head adapts, as in learn2learn's
                # ANIL example)
                torch.manual_seed(0)
                backbone_args = {} if edgemeta_backbone else deployment_args(args.backbone, {})
                embedder = Embedder(args.backbone, spec, backbone_args, channels_last=edgemeta_backbone)
                model = MAML(embedder, args.way, args.steps, 0.4)
                use_batch_statistics(model)
                return model

            def runner(model, clone: bool, precision: str):
                def run():
                    model.zero_grad()
                    with autocast(precision, "cpu"):
                        if clone:
                            loop_meta_step(model, sx, sy, qx, qy, args.steps, 0.4, name == "fomaml", name == "anil")
                        else:
                            model.meta_step(sx, sy, qx, qy)
                return run
            runs = {"edgemeta": runner(make(False), False, "fp32"), "edgemeta bf16": runner(make(False), False, "bf16"),
                    "vectorised": runner(make(True), False, "fp32"), "clone": runner(baseline(False), True, "fp32"),
                    "clone bf16": runner(baseline(False), True, "bf16"),
                    "clone, edgemeta backbone": runner(baseline(True), True, "fp32")}
            t = interleaved(runs, rounds=3, repeats=5, warmup=2)
            eps = {k: mb / v for k, v in t.items()}
            flops = flops_per_episode(make(False), sx, sy, qx, qy)
            print(f"{name:>6} {mb:>2} | " + " | ".join(f"{eps[k]:5.1f}" for k in columns) + " | "
                  + " | ".join(f"{eps[a] / eps[b]:.2f}×" for a, b in ratios)
                  + f" | {flops / 1e9:.2f}")
            ceilings.append((name, mb, flops, eps["clone"]))
    rates.append((conv_flops_per_second(), conv_flops_per_second(torch.bfloat16)))
    rate, rate_bf16 = (max(r) for r in zip(*rates))
    print("dominant convolution alone, GFLOP/s (before, after the table): fp32 "
          + ", ".join(f"{r[0] / 1e9:.0f}" for r in rates) + "; bf16 " + ", ".join(f"{r[1] / 1e9:.0f}" for r in rates))
    print("ceiling ÷ clone loop (episode FLOPs at the faster rate, memory-bound passes free): "
          + "; ".join(f"{name} {mb}: fp32 {rate / flops / clone:.2f}×, bf16 {rate_bf16 / flops / clone:.2f}×"
                      for name, mb, flops, clone in ceilings))


if __name__ == "__main__":
    main()
