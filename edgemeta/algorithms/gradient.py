"""Gradient-based meta-learning: MAML (second order), first-order MAML, ANIL and Reptile.

Inner loops are functional (`torch.func.functional_call` + `torch.func.grad`): no module clones.
With vectorize=True the meta-batch of tasks runs at once (`torch.func.vmap` over tasks; ANIL runs
all tasks' images through the shared backbone as one batch with per-task BatchNorm statistics);
with vectorize=False the tasks run one after another. Vectorising is meant for a GPU, where small
kernels are launch-bound (not measured: no GPU here); on a CPU these conv nets are memory-bound
and one large batch is slower than several small ones (benchmarks/maml_speed.py), so the default
is to vectorise on CUDA only. What speeds the CPU up is the backbone set-up — channels-last
activations (see Embedder), max-pool before the activation (see Conv4) — keeping freed memory
(edgemeta.runtime.malloc), second-order MAML's support pass in NCHW (see MAML.adapt) and, opt-in,
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
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from edgemeta.backbones import Embedder, nchw_activations
from edgemeta.data.episodes import stack_tasks
from edgemeta.heads import logistic_fit, logistic_logits

from .base import LearnerSettings, LogitsFn, MetaLearner, Step, episode_loss, register
from .batchnorm import TaskBatchNorm, recalibrate_batchnorm, use_batch_statistics

GRADIENT_ALGORITHMS = ("maml", "fomaml", "anil", "reptile")
loss_and_accuracy = episode_loss


def loop_over_tasks(task_loss, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """task_loss(t) → (loss, accuracy) for t in range(tasks), stacked: ([T], [T])."""
    pairs = [task_loss(t) for t in range(tasks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def backward_mean(losses: torch.Tensor, accs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate the mean query loss of the meta-batch; returns (loss, accuracy) for the log."""
    loss = losses.mean()
    loss.backward()
    return loss.detach(), accs.mean().detach()


class _Adapting(MetaLearner):
    """Learners that adapt to each task by gradient steps in the inner loop (MAML, FOMAML, ANIL,
    Reptile): BatchNorm with batch statistics per task, evaluation by their own adaptation on the
    episode's images, running statistics recomputed for the shipped backbone."""

    syncs_own_gradients = True

    def meta_learn(self, step: Step) -> tuple[float, float]:
        sx, sy, qx, qy = stack_tasks(step.episodes(), step.inputs)
        loss, acc = self.meta_step(sx, sy.to(step.device), qx, qy.to(step.device))
        step.average_gradients(self)
        return loss.item(), acc.item()

    def meta_step(self, sx, sy, qx, qy) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def logits_after_adaptation(self, sx, sy, qx, steps: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def evaluation_logits(self, device: str = "cpu") -> tuple[LogitsFn, bool]:
        from .base import adaptation_logits_fn
        return adaptation_logits_fn(self, device), True

    def deployable_state(self, calibration_batches) -> dict[str, torch.Tensor]:
        """Meta-trained with batch statistics: the device embeds one image at a time, so the shipped
        BatchNorm running statistics are recomputed on training images."""
        stats = recalibrate_batchnorm(self.embedder, calibration_batches())
        return {**self.state_dict(), **{f"embedder.{k}": v for k, v in stats.items()}}


class _WholeNetwork(_Adapting):
    """Shared by MAML, FOMAML and Reptile: backbone + linear head adapted together in the inner loop,
    parameters as a dict (functional, no module clones), evaluation by fine-tuning a copy."""

    algorithm: str
    first_order: bool = True

    def _build(self, embedder: Embedder, n_way: int, inner_steps: int, inner_lr: float) -> None:
        use_batch_statistics(embedder)
        self.embedder = embedder
        self.head = nn.Linear(embedder.embed_dim, n_way)
        nn.init.zeros_(self.head.weight)  # zero head init: no class is preferred before adaptation
        nn.init.zeros_(self.head.bias)
        self.n_way, self.inner_steps, self.inner_lr = n_way, inner_steps, inner_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x))

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_parameters() if not k.startswith("inner_log_lr")}

    def fmodel(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self, params, (x,))

    def _lr(self, name: str) -> torch.Tensor | float:
        return self.inner_lr

    def adapt(self, params: dict, sx: torch.Tensor, sy: torch.Tensor, steps: int | None = None,
              meta_gradient: bool = False) -> dict:
        """The inner loop: SGD on the support loss. meta_gradient=True when a second-order
        meta-gradient will flow back through it (MAML while meta-training): the support pass then
        runs in NCHW, where autograd's double backward through BatchNorm is faster than in
        channels-last (its composite mixes layouts); the query pass keeps the embedder's layout."""
        def support_loss(p):
            return F.cross_entropy(self.fmodel(p, sx), sy)
        second_order = meta_gradient and not self.first_order
        with nchw_activations(self.embedder) if second_order else nullcontext():
            for _ in range(self.inner_steps if steps is None else steps):
                g = grad(support_loss)(params)
                if not second_order:
                    g = {k: v.detach() for k, v in g.items()}
                params = {k: v - self._lr(k) * g[k] for k, v in params.items()}
        return params

    @torch.no_grad()
    def logits_after_adaptation(self, sx, sy, qx, steps: int | None = None) -> torch.Tensor:
        """Evaluation: adapt a copy of the parameters to the support set, score the query."""
        with torch.enable_grad():
            params = self.adapt({k: v.detach() for k, v in self.params().items()}, sx, sy, steps)
        return self.fmodel({k: v.detach() for k, v in params.items()}, qx)

    def head_config(self) -> dict:
        return {"kind": "finetune", "algorithm": self.algorithm, "steps": self.inner_steps, "lr": self.inner_lr,
                "n_way": self.n_way,
                "device_head": {"kind": "logistic", "steps": self.inner_steps, "lr": self.inner_lr, "momentum": 0.0}}


@register("maml")
def _maml(embedder: Embedder, s: LearnerSettings) -> MAML:
    return MAML(embedder, s.way, s.inner_steps, s.inner_lr, first_order=False, learn_inner_lr=s.learn_inner_lr,
                vectorize=s.vectorize)


@register("fomaml")
def _fomaml(embedder: Embedder, s: LearnerSettings) -> MAML:
    return MAML(embedder, s.way, s.inner_steps, s.inner_lr, first_order=True, learn_inner_lr=s.learn_inner_lr,
                vectorize=s.vectorize)


class MAML(_WholeNetwork):
    """MAML: the whole network (backbone + linear head) adapts in the inner loop; the meta-gradient
    flows through the inner updates (second order) unless first_order=True (FOMAML)."""

    def __init__(self, embedder: Embedder, n_way: int, inner_steps: int = 5, inner_lr: float = 0.4,
                 first_order: bool = False, learn_inner_lr: bool = False, vectorize: bool = False):
        super().__init__()
        self._build(embedder, n_way, inner_steps, inner_lr)
        self.first_order, self.vectorize = first_order, vectorize
        self.algorithm = "fomaml" if first_order else "maml"
        names = [k for k, _ in self.named_parameters()]
        # Meta-SGD style: one learned log step size per parameter tensor (layer), when asked
        self.inner_log_lr = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(torch.tensor(math.log(inner_lr)),
                                                                                  requires_grad=learn_inner_lr)
                                              for k in names})

    def _lr(self, name: str) -> torch.Tensor:
        return self.inner_log_lr[name.replace(".", "_")].exp()

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


@register("anil")
def _anil(embedder: Embedder, s: LearnerSettings) -> ANIL:
    return ANIL(embedder, s.inner_steps, s.inner_lr, vectorize=s.vectorize)


class ANIL(_Adapting):
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
        with TaskBatchNorm(self.embedder, tasks):
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


@register("reptile")
def _reptile(embedder: Embedder, s: LearnerSettings) -> Reptile:
    return Reptile(embedder, s.way, s.inner_steps, s.inner_lr, s.reptile_epsilon, vectorize=s.vectorize)


class Reptile(_WholeNetwork):
    """Reptile (Nichol et al. 2018): k SGD steps per task from φ give θ_i; then
    φ ← φ + ε · mean_i(θ_i − φ). No second derivatives; the update is applied here, not by an optimizer."""

    applies_update = True
    algorithm = "reptile"

    def __init__(self, embedder: Embedder, n_way: int, inner_steps: int = 5, inner_lr: float = 0.1, epsilon: float = 1.0,
                 vectorize: bool = False):
        super().__init__()
        self._build(embedder, n_way, inner_steps, inner_lr)
        self.epsilon, self.vectorize = epsilon, vectorize

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

    def meta_learn(self, step: Step) -> tuple[float, float]:
        """The ε schedule follows the learning-rate schedule; the direction is averaged across ranks."""
        sx, sy, qx, qy = stack_tasks(step.episodes(), step.inputs)
        loss, acc = self.meta_step(sx, sy.to(step.device), qx, qy.to(step.device),
                                   epsilon=self.epsilon * step.lr_factor, reduce=step.average_tensors)
        return loss.item(), acc.item()

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
