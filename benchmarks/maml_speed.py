"""Episodes per second of edgemeta's vectorised meta-batch against a straightforward per-task loop
that clones the model (the way learn2learn's MAML.clone()/adapt() works), same backbone, data and
episode shape, measured side by side in one run.

    python benchmarks/maml_speed.py [--meta-batch 4,8] [--way 5] [--shot 1] [--query 15] [--steps 1]
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
    for (name, m), (_, src) in zip(clone.named_modules(), module.named_modules()):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta-batch", default="4,8")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=1)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from edgemeta.algorithms import ANIL, MAML
    from edgemeta.algorithms.gradient import stack_tasks, use_batch_statistics
    from edgemeta.backbones import Embedder
    from edgemeta.data import EpisodeSampler, load_dataset
    from edgemeta.runtime import InputSpec, pixels_to_batch
    torch.set_num_threads(args.threads)
    data = load_dataset(SHIPPED_DATA, 28)
    sampler = EpisodeSampler(data.labels, args.way, args.shot, args.query, seed=0)
    spec = InputSpec(28, 28, "L", (0.92,), (0.24,))
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} threads; conv4 28×28, "
          f"{args.way}-way {args.shot}-shot {args.query}-query, {args.steps} inner step(s)")
    print(f"{'algorithm':>10} {'meta-batch':>10} | {'vectorised ep/s':>15} | {'task loop ep/s':>14} | "
          f"{'clone loop ep/s':>15} | vectorised/clone | task loop/clone")
    for mb in [int(v) for v in args.meta_batch.split(",")]:
        episodes = sampler.episodes(mb)
        sx, sy, qx, qy = stack_tasks(episodes, lambda idx: torch.from_numpy(pixels_to_batch(data.pixels[idx])))
        for name in ("fomaml", "maml", "anil"):
            def make(vectorize):
                torch.manual_seed(0)
                if name == "anil":
                    return ANIL(Embedder("conv4", spec), args.steps, 0.4, vectorize=vectorize)
                return MAML(Embedder("conv4", spec), args.way, args.steps, 0.4, first_order=name == "fomaml",
                            vectorize=vectorize)
            vec, seq = make(True), make(False)
            # the loop baseline: a linear head on the backbone (for ANIL only the head adapts, as in
            # learn2learn's ANIL example)
            base_model = MAML(Embedder("conv4", spec), args.way, args.steps, 0.4)
            use_batch_statistics(base_model)

            def run_vec():
                vec.zero_grad()
                vec.meta_step(sx, sy, qx, qy)

            def run_seq():
                seq.zero_grad()
                seq.meta_step(sx, sy, qx, qy)

            def run_loop():
                base_model.zero_grad()
                loop_meta_step(base_model, sx, sy, qx, qy, args.steps, 0.4, name == "fomaml", name == "anil")
            t = interleaved({"vec": run_vec, "seq": run_seq, "loop": run_loop}, rounds=3, repeats=5, warmup=2)
            print(f"{name:>10} {mb:>10} | {mb / t['vec']:>15.1f} | {mb / t['seq']:>14.1f} | {mb / t['loop']:>15.1f} | "
                  f"{t['loop'] / t['vec']:>15.2f}× | {t['loop'] / t['seq']:>14.2f}×")


if __name__ == "__main__":
    main()
