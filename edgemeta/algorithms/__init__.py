"""Meta-learning algorithms: each wraps an Embedder and maps an episode to query logits."""
from __future__ import annotations

from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.runtime.errors import ConfigError

from .closed_form import R2D2, ProtoNet
from .pretrain import Pretrain

ALGORITHMS = ("protonet", "r2d2", "pretrain")
EPISODIC = ("protonet", "r2d2")


def create_algorithm(name: str, embedder: Embedder, metric: str = "euclidean", ridge_lambda: float = 1.0,
                     n_classes: int = 0) -> nn.Module:
    if name == "pretrain":
        return Pretrain(embedder, n_classes)
    if name == "protonet":
        return ProtoNet(embedder, metric=metric)
    if name == "r2d2":
        return R2D2(embedder, lam=ridge_lambda)
    raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


__all__ = ["ALGORITHMS", "EPISODIC", "Pretrain", "ProtoNet", "R2D2", "create_algorithm"]
