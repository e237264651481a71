"""Gradient-based meta-learning: MAML (second order), first-order MAML, ANIL and Reptile.

Inner loops are functional (`torch.func.functional_call` + `torch.func.grad`): no module clones.
With vectorize=True the meta-batch of tasks runs at once (`torch.func.vmap` over tasks; ANIL runs
all tasks' images through the shared backbone as one batch with per-task BatchNorm statistics);
with vectorize=False the tasks run one after another. Vectorising is meant for a GPU, where small
kernels are launch-bound (not measured: no GPU here); on a CPU these conv nets are memory-bound
and one large batch is slower than several small ones (benchmarks/maml_speed.py), so the default
is to vectorise on CUDA only. What speeds the CPU up is the backbone set-up — channels-last
activations (see Embedder), max-pool before the activation (see Conv4) — keeping freed memory
(edgemeta.memory), second-order MAML's support pass in NCHW (see MAML.adapt) and, opt-in,
bfloat16 autocast (edgemeta.precision); vmap cannot re-stride batched tensors, so the layout
switch stands down inside vmap.

BatchNorm: as in MAML (Finn et al. 2017) and its PyTorch reimplementations, BatchNorm uses the
batch statistics of each task's images during adaptation and evaluation (no running statistics
while meta-training; transductive over the query batch). `edgemeta eval` on these checkpoints
adapts the same way. Because the device embeds one image at a time, the running statistics of the
exported backbone are recomputed on training images when a checkpoint is saved
(`recalibrate_batchnorm`), so frozen-embedding heads use fixed statistics.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from edgemeta.backbones import Embedder
from edgemeta.heads import logistic_fit, logistic_logits

GRADIENT_ALGORITHMS = ("maml", "fomaml", "anil", "reptile")


def use_batch_statistics(module: nn.Module) -> None:
    """BatchNorm layers normalise with each batch's statistics and keep no running statistics
    (required under vmap, and the MAML convention)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None


@torch.no_grad()
def recalibrate_batchnorm(embedder: Embedder, batches) -> dict[str, torch.Tensor]:
    """Running statistics for every BatchNorm layer, averaged over `batches` of training images
    (cumulative mean). Returns them as state-dict entries; the module itself is left unchanged."""
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in embedder.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inp, out, name=name):
                x = inp[0]
                dims = [0, 2, 3]
                stats.setdefault(name, []).append(torch.stack([x.mean(dims), x.var(dims, unbiased=True)]))
            hooks.append(m.register_forward_hook(hook))
    was_training = embedder.training
    embedder.train()
    for x in batches:
        embedder(x)
    embedder.train(was_training)
    for h in hooks:
        h.remove()
    out = {}
    for name, values in stats.items():
        mean, var = torch.stack(values).mean(0)
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean, var
        out[f"{name}.num_batches_tracked"] = torch.tensor(len(values))
    return out


@contextmanager
def nchw_activations(embedder: Embedder):
    """The embedder keeps its input's layout (NCHW) inside the block; the flag is restored after.
    Used where channels-last does not pay or cannot be had: under vmap (which cannot re-stride a
    batched tensor) and on second-order MAML's support pass, whose double backward through
    BatchNorm runs faster in NCHW (measured in docs/benchmarks.md, section 4)."""
    saved, embedder.channels_last = embedder.channels_last, False
    try:
        yield
    finally:
        embedder.channels_last = saved


class task_batchnorm:
    """Context manager: every BatchNorm layer of `module` normalises each task's images with that
    task's own statistics while the images of T tasks run through the network as ONE batch
    [T·B, C, H, W]. Same numbers as T separate forward passes; one large convolution instead of T
    small ones (what pays on a GPU; on this CPU it measured slower, benchmarks/maml_speed.py)."""

    def __init__(self, module: nn.Module, tasks: int):
        self.layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.tasks = tasks

    def __enter__(self):
        for m in self.layers:
            m.forward = self._grouped(m)
        return self

    def _grouped(self, m):
        tasks = self.tasks

        def forward(x):
            # [T·B, C, …] → [B, T·C, …]: each (task, channel) pair becomes a channel of one native,
            # fused batch_norm call with batch statistics
            n, c = x.shape[:2]
            rest = x.shape[2:]
            y = x.reshape(tasks, n // tasks, c, *rest).transpose(0, 1).reshape(n // tasks, tasks * c, *rest)
            y = F.batch_norm(y, None, None, m.weight.repeat(tasks), m.bias.repeat(tasks), training=True, eps=m.eps)
            return y.reshape(n // tasks, tasks, c, *rest).transpose(0, 1).reshape(x.shape)
        return forward

    def __exit__(self, *exc):
        for m in self.layers:
            del m.forward  # back to the class's forward


def loop_over_tasks(task_loss, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """task_loss(t) → (loss, accuracy) for t in range(tasks), stacked: ([T], [T])."""
    pairs = [task_loss(t) for t in range(tasks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the query logits and their accuracy (a fraction)."""
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def backward_mean(losses: torch.Tensor, accs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate the mean query loss of the meta-batch; returns (loss, accuracy) for the log."""
    loss = losses.mean()
    loss.backward()
    return loss.detach(), accs.mean().detach()


class _Functional(nn.Module):
    """Shared plumbing for whole-network adaptation: backbone + linear head, parameters as a dict,
    forward with any parameter dict."""

    def _build(self, embedder: Embedder, n_way: int) -> None:
        use_batch_statistics(embedder)
        self.embedder = embedder
        self.head = nn.Linear(embedder.embed_dim, n_way)
        nn.init.zeros_(self.head.weight)  # zero head init: no class is preferred before adaptation
        nn.init.zeros_(self.head.bias)
        self.n_way = n_way

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x))

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_parameters() if not k.startswith("inner_log_lr")}

    def fmodel(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self, params, (x,))


class MAML(_Functional):
    """MAML: the whole network (backbone + linear head) adapts in the inner loop; the meta-gradient
    flows through the inner updates (second order) unless first_order=True (FOMAML)."""

    def __init__(self, embedder: Embedder, n_way: int, inner_steps: int = 5, inner_lr: float = 0.4,
                 first_order: bool = False, learn_inner_lr: bool = False, vectorize: bool = False):
        super().__init__()
        self._build(embedder, n_way)
        self.inner_steps, self.first_order, self.inner_lr = inner_steps, first_order, inner_lr
        self.vectorize = vectorize
        names = [k for k, _ in self.named_parameters()]
        # Meta-SGD style: one learned log step size per parameter tensor (layer), when asked
        self.inner_log_lr = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.tensor(math.log(inner_lr)),
                                                                                  requires_grad=learn_inner_lr)
                                              for k in names})

    def _lr(self, name: str) -> torch.Tensor:
        return self.inner_log_lr[name.replace(".", "_")].exp()

    def adapt(self, params: dict, sx: torch.Tensor, sy: torch.Tensor, steps: int | None = None,
              meta_gradient: bool = False) -> dict:
        """The inner loop. meta_gradient=True when the meta-gradient will flow back through it
        (meta-training): second order, the support pass then runs in NCHW, where autograd's double
        backward through BatchNorm is faster than in channels-last (its composite mixes layouts);
        the query pass keeps the embedder's layout."""
        def support_loss(p):
            return F.cross_entropy(self.fmodel(p, sx), sy)
        layout = nchw_activations(self.embedder) if meta_gradient and not self.first_order else nullcontext()
        with layout:
            for _ in range(self.inner_steps if steps is None else steps):
                g = grad(support_loss)(params)
                if self.first_order:
                    g = {k: v.detach() for k, v in g.items()}
                params = {k: v - self._lr(k) * g[k] for k, v in params.items()}
        return params

    def task_loss(self, params, sx, sy, qx, qy):
        return loss_and_accuracy(self.fmodel(self.adapt(params, sx, sy, meta_gradient=True), qx), qy)

    def meta_step(self, sx, sy, qx, qy) -> tuple[torch.Tensor, torch.Tensor]:
        """Tasks stacked on dim 0: sx [T, n*k, C, H, W], sy [n*k] (the same labels for every task).
        Backpropagates the mean query loss into the meta-parameters' .grad.

        First order with vectorize=True: all tasks at once under vmap. Otherwise a loop over tasks
        (functional, no module clones). Second order always loops: under vmap PyTorch's batching rule
        for the convolution's double backward gives a different weight gradient than autograd and
        finite differences (tests/test_gradient_meta.py checks both paths).
        """
        if self.first_order and self.vectorize:
            with nchw_activations(self.embedder):
                losses, accs = vmap(self.task_loss, in_dims=(None, 0, None, 0, None), randomness="same")(
                    self.params(), sx, sy, qx, qy)
        else:
            params = self.params()
            losses, accs = loop_over_tasks(lambda t: self.task_loss(params, sx[t], sy, qx[t], qy), sx.shape[0])
        return backward_mean(losses, accs)

    @torch.no_grad()
    def logits_after_adaptation(self, sx, sy, qx, steps: int | None = None) -> torch.Tensor:
        """Evaluation: adapt a copy of the parameters to the support set, score the query."""
        with torch.enable_grad():
            params = self.adapt({k: v.detach() for k, v in self.params().items()}, sx, sy, steps)
        return self.fmodel({k: v.detach() for k, v in params.items()}, qx)

    def head_config(self) -> dict:
        return {"kind": "finetune", "algorithm": "fomaml" if self.first_order else "maml",
                "steps": self.inner_steps, "lr": self.inner_lr, "n_way": self.n_way,
                "device_head": {"kind": "logistic", "steps": self.inner_steps, "lr": self.inner_lr, "momentum": 0.0}}


class ANIL(nn.Module):
    """ANIL (Raghu et al. 2020): only the final linear head adapts in the inner loop, with exactly
    the logistic-head SGD of edgemeta.heads (the device's NumPy twin runs the same steps), from the
    imprinted-prototype initialisation; the backbone is meta-learned through those steps."""

    def __init__(self, embedder: Embedder, inner_steps: int = 10, inner_lr: float = 0.5, first_order: bool = False,
                 vectorize: bool = False):
        super().__init__()
        use_batch_statistics(embedder)
        self.embedder, self.inner_steps, self.inner_lr, self.first_order = embedder, inner_steps, inner_lr, first_order
        self.vectorize = vectorize

    def head_logits(self, s, sy, q, n_way: int, steps: int | None = None):
        """The inner loop: the device's logistic-head SGD on support embeddings s, then query logits.
        Always float32, as on the device, also when the backbone trains under bf16 autocast."""
        with torch.autocast(s.device.type, enabled=False):
            dtype = torch.promote_types(s.dtype, torch.float32)  # bf16 → fp32; fp64 (tests) stays
            s, q = s.to(dtype), q.to(dtype)
            w, b = logistic_fit(s.detach() if self.first_order else s, sy, n_way,
                                self.inner_steps if steps is None else steps, self.inner_lr)
            return logistic_logits(q, w, b)

    def task_logits(self, params, sx, sy, qx, n_way: int):
        z = functional_call(self.embedder, params, (torch.cat([sx, qx]),))
        return self.head_logits(z[: sx.shape[0]], sy, z[sx.shape[0]:], n_way)

    def task_loss(self, params, sx, sy, qx, qy, n_way):
        return loss_and_accuracy(self.task_logits(params, sx, sy, qx, n_way), qy)

    def meta_step(self, sx, sy, qx, qy):
        """A loop over tasks, or with vectorize=True: the backbone is shared by all tasks (only the
        head adapts), so the T tasks' images run as one batch with per-task BatchNorm statistics and
        the head's inner loops run under vmap."""
        n_way, tasks = int(sy.max()) + 1, sx.shape[0]
        if not self.vectorize:
            params = dict(self.embedder.named_parameters())
            return backward_mean(*loop_over_tasks(lambda t: self.task_loss(params, sx[t], sy, qx[t], qy, n_way), tasks))
        images = torch.cat([sx, qx], 1)                       # [T, n_s + n_q, C, H, W]
        with task_batchnorm(self.embedder, tasks):
            z = self.embedder(images.reshape(-1, *images.shape[2:])).reshape(tasks, images.shape[1], -1)
        s, q = z[:, : sx.shape[1]], z[:, sx.shape[1]:]

        def head_loss(s_t, q_t):
            return loss_and_accuracy(self.head_logits(s_t, sy, q_t, n_way), qy)
        return backward_mean(*vmap(head_loss)(s, q))

    @torch.no_grad()
    def logits_after_adaptation(self, sx, sy, qx, steps: int | None = None):
        n_way = int(sy.max()) + 1
        z = self.embedder(torch.cat([sx, qx]))
        return self.head_logits(z[: len(sx)], sy, z[len(sx):], n_way, steps)

    def head_config(self) -> dict:
        return {"kind": "logistic", "steps": self.inner_steps, "lr": self.inner_lr, "momentum": 0.0,
                "weight_decay": 0.0, "init": "prototype"}


class Reptile(_Functional):
    """Reptile (Nichol et al. 2018): k SGD steps per task from φ give θ_i; then
    φ ← φ + ε · mean_i(θ_i − φ). No second derivatives; the update is applied here, not by an optimizer."""

    applies_update = True

    def __init__(self, embedder: Embedder, n_way: int, inner_steps: int = 5, inner_lr: float = 0.1, epsilon: float = 1.0,
                 vectorize: bool = False):
        super().__init__()
        self._build(embedder, n_way)
        self.inner_steps, self.inner_lr, self.epsilon, self.vectorize = inner_steps, inner_lr, epsilon, vectorize

    def adapt(self, params, x, y, steps: int | None = None):
        def loss_fn(p):
            return F.cross_entropy(self.fmodel(p, x), y)
        for _ in range(self.inner_steps if steps is None else steps):
            g = grad(loss_fn)(params)
            params = {k: v - self.inner_lr * g[k] for k, v in params.items()}
        return params

    @torch.no_grad()
    def reptile_direction(self, sx, sy) -> dict[str, torch.Tensor]:
        """mean_i(θ_i − φ) over the stacked tasks."""
        phi = {k: v.detach() for k, v in self.params().items()}
        with torch.enable_grad():
            if self.vectorize:
                with nchw_activations(self.embedder):
                    adapted = vmap(lambda x: self.adapt(phi, x, sy), randomness="same")(sx)
            else:
                runs = [self.adapt(phi, sx[t], sy) for t in range(sx.shape[0])]
                adapted = {k: torch.stack([r[k] for r in runs]) for k in phi}
        return {k: (adapted[k] - phi[k]).mean(0) for k in phi}

    def meta_step(self, sx, sy, qx, qy, epsilon: float | None = None, reduce=None):
        direction = self.reptile_direction(sx, sy)
        if reduce is not None:
            direction = reduce(direction)
        eps = self.epsilon if epsilon is None else epsilon
        with torch.no_grad():
            for k, p in self.named_parameters():
                if k in direction:
                    p.add_(eps * direction[k])
        return self._query_metrics(sx, sy, qx, qy)

    def _query_metrics(self, sx, sy, qx, qy):
        """For the log: query loss/accuracy after adapting the new φ to the first task."""
        return loss_and_accuracy(self.logits_after_adaptation(sx[0], sy, qx[0]), qy)  # no graph: no_grad

    @torch.no_grad()
    def logits_after_adaptation(self, sx, sy, qx, steps: int | None = None):
        with torch.enable_grad():
            params = self.adapt({k: v.detach() for k, v in self.params().items()}, sx, sy, steps)
        return self.fmodel({k: v.detach() for k, v in params.items()}, qx)

    def head_config(self) -> dict:
        return {"kind": "finetune", "algorithm": "reptile", "steps": self.inner_steps, "lr": self.inner_lr,
                "n_way": self.n_way,
                "device_head": {"kind": "logistic", "steps": self.inner_steps, "lr": self.inner_lr, "momentum": 0.0}}


def stack_tasks(episodes, to_input) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Episodes → (sx [T, n*k, C, H, W], sy [n*k], qx [T, n*q, C, H, W], qy [n*q]); labels are shared."""
    sy = torch.from_numpy(episodes[0].support_labels)
    qy = torch.from_numpy(episodes[0].query_labels)
    for ep in episodes:
        assert np.array_equal(ep.support_labels, episodes[0].support_labels)
    sx = torch.stack([to_input(ep.support) for ep in episodes])
    qx = torch.stack([to_input(ep.query) for ep in episodes])
    return sx, sy, qx, qy
