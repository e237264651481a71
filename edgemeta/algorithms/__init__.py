"""Meta-learning algorithms: each wraps an Embedder and maps an episode to query logits."""
from __future__ import annotations

from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.runtime.errors import ConfigError

from .closed_form import R2D2, ProtoNet
from .gradient import ANIL, GRADIENT_ALGORITHMS, MAML, Reptile
from .pretrain import Pretrain

ALGORITHMS = ("protonet", "r2d2", "pretrain", *GRADIENT_ALGORITHMS)
EPISODIC = ("protonet", "r2d2")


def create_algorithm(name: str, embedder: Embedder, metric: str = "euclidean", ridge_lambda: float = 1.0,
                     n_classes: int = 0, n_way: int = 5, inner_steps: int = 5, inner_lr: float = 0.4,
                     learn_inner_lr: bool = False, reptile_epsilon: float = 1.0, vectorize: bool = False) -> nn.Module:
    if name == "pretrain":
        return Pretrain(embedder, n_classes)
    if name in ("maml", "fomaml"):
        return MAML(embedder, n_way, inner_steps, inner_lr, first_order=name == "fomaml", learn_inner_lr=learn_inner_lr,
                    vectorize=vectorize)
    if name == "anil":
        return ANIL(embedder, inner_steps, inner_lr, vectorize=vectorize)
    if name == "reptile":
        return Reptile(embedder, n_way, inner_steps, inner_lr, reptile_epsilon, vectorize=vectorize)
    if name == "protonet":
        return ProtoNet(embedder, metric=metric)
    if name == "r2d2":
        return R2D2(embedder, lam=ridge_lambda)
    raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


__all__ = ["ALGORITHMS", "ANIL", "EPISODIC", "GRADIENT_ALGORITHMS", "MAML", "Pretrain", "ProtoNet", "R2D2", "Reptile",
           "create_algorithm"]
