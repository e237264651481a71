"""Meta-learners whose head has a closed form: ProtoNet (Snell et al. 2017) and R2-D2 (Bertinetto
et al. 2019). The backbone is trained end to end through the head on each episode's query loss."""
from __future__ import annotations

import math

import torch
from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.heads import class_means, prototype_logits, ridge_fit, ridge_logits

from .base import LearnerSettings, MetaLearner, Step, accumulate, episode_loss, register


class _Episodic(MetaLearner):
    """Learners trained end to end through a closed-form head on each episode's query loss. The
    forward takes a whole episode, so DistributedDataParallel can wrap it."""

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, n_way: int) -> torch.Tensor:
        z = self.embedder(torch.cat([support_x, query_x]))
        return self.logits_from_embeddings(z[: len(support_x)], support_y, z[len(support_x):], n_way)

    def meta_learn(self, step: Step) -> tuple[float, float]:
        episodes = step.episodes()

        def loss_of(j):
            ep = episodes[j]
            sy = torch.from_numpy(ep.support_labels).to(step.device)
            qy = torch.from_numpy(ep.query_labels).to(step.device)
            return episode_loss(step.forward(step.inputs(ep.support), sy, step.inputs(ep.query), step.way), qy)
        return accumulate(step, loss_of)


@register("protonet")
def _protonet(embedder: Embedder, s: LearnerSettings) -> ProtoNet:
    return ProtoNet(embedder, metric=s.metric)


@register("r2d2")
def _r2d2(embedder: Embedder, s: LearnerSettings) -> R2D2:
    return R2D2(embedder, lam=s.ridge_lambda)


class ProtoNet(_Episodic):
    """Prototypical networks. Euclidean by default (scale fixed at 1); cosine learns its scale."""

    def __init__(self, embedder: Embedder, metric: str = "euclidean", scale: float | None = None):
        super().__init__()
        self.embedder, self.metric = embedder, metric
        learn = metric == "cosine"
        init = scale if scale is not None else (10.0 if learn else 1.0)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)

    def logits_from_embeddings(self, s, support_y, q, n_way):
        return prototype_logits(q, class_means(s, support_y, n_way), self.metric, self.log_scale.exp())

    def head_config(self) -> dict:
        return {"kind": "prototype", "metric": self.metric, "scale": self.log_scale.exp().item()}


class R2D2(_Episodic):
    """Ridge-regression differentiable discriminator: closed-form ridge head, learnable output
    scale and bias (the "adjust" layer), λ fixed by the config."""

    def __init__(self, embedder: Embedder, lam: float = 1.0, scale: float = 10.0):
        super().__init__()
        self.embedder, self.lam = embedder, lam
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def logits_from_embeddings(self, s, support_y, q, n_way):
        return ridge_logits(q, ridge_fit(s, support_y, n_way, self.lam), self.log_scale.exp(), self.bias)

    def head_config(self) -> dict:
        return {"kind": "ridge", "lambda": self.lam, "scale": self.log_scale.exp().item(), "bias": self.bias.item()}
