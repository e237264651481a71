"""Meta-learning algorithms: each is a MetaLearner (edgemeta.algorithms.base) wrapping an
Embedder, registered by name."""
from __future__ import annotations

from .base import LearnerSettings, MetaLearner, Step, adaptation_logits_fn, check_algorithm, create_algorithm, list_algorithms, register
from .closed_form import R2D2, ProtoNet
from .gradient import ANIL, GRADIENT_ALGORITHMS, MAML, Reptile
from .pretrain import Pretrain

ALGORITHMS = tuple(list_algorithms())

__all__ = ["ALGORITHMS", "ANIL", "GRADIENT_ALGORITHMS", "MAML", "LearnerSettings", "MetaLearner", "Pretrain", "adaptation_logits_fn",
           "ProtoNet", "R2D2", "Reptile", "Step", "check_algorithm", "create_algorithm", "list_algorithms", "register"]
