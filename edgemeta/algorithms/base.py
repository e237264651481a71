"""The one interface every meta-learner fits, and the registry that builds them by name.

A MetaLearner wraps an Embedder and knows three things: how to learn from one training step
(`meta_learn(step) -> (loss, accuracy)`, gradients left in `.grad` for the optimizer unless the
learner applies its own update, as Reptile does), how to score an evaluation episode
(`evaluation_logits`), and what to ship (`head_config`, `deployable_state`). The training loop
(edgemeta.train) runs, validates and checkpoints every learner the same way.

Learners register like backbones do: `@register("protonet")` on a factory taking
(embedder, LearnerSettings); `create_algorithm(name, embedder, settings)` builds one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.config import TrainConfig
from edgemeta.data.episodes import Episode
from edgemeta.runtime.errors import ConfigError

# (support, support_labels, query, n_way) → query logits, all NumPy: the evaluation protocol's view
LogitsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # one set of defaults: TrainConfig's


@dataclass(frozen=True)
class LearnerSettings:
    """What a learner is built with: the algorithm fields of a TrainConfig (their defaults are
    TrainConfig's own, never a second copy), and the number of training classes (pre-training's
    classifier)."""

    metric: str = _DEFAULTS["metric"]
    ridge_lambda: float = _DEFAULTS["ridge_lambda"]
    n_classes: int = 0
    way: int = _DEFAULTS["way"]
    inner_steps: int = _DEFAULTS["inner_steps"]
    inner_lr: float = _DEFAULTS["inner_lr"]
    learn_inner_lr: bool = _DEFAULTS["learn_inner_lr"]
    reptile_epsilon: float = _DEFAULTS["reptile_epsilon"]
    vectorize: bool = False
    teacher: str = _DEFAULTS["teacher"]
    distill_alpha: float = _DEFAULTS["distill_alpha"]
    distill_temperature: float = _DEFAULTS["distill_temperature"]
    rotation_weight: float = _DEFAULTS["rotation_weight"]
    classifier: str = _DEFAULTS["classifier"]
    mixup: float = _DEFAULTS["mixup"]

    @classmethod
    def from_train_config(cls, config, n_classes: int = 0) -> LearnerSettings:
        """From a TrainConfig, or from a checkpoint's `train_config` dict (missing keys: defaults)."""
        values = config if isinstance(config, dict) else config.to_dict()
        known = {f.name for f in fields(cls)} - {"n_classes", "vectorize"}
        vectorize = config.switch("vectorize") if not isinstance(config, dict) else False
        return cls(n_classes=n_classes, vectorize=vectorize, **{k: values[k] for k in known if k in values})


@dataclass
class Step:
    """One training step as a learner sees it. The loop fills it; the learner takes what it needs."""

    index: int                                               # optimizer step, from 0
    meta_batch: int                                          # tasks (or image batches) per step
    way: int
    episodes: Callable[[], list[Episode]]                    # this rank's tasks for the step
    images: Callable[[int], tuple[np.ndarray, np.ndarray]]   # pre-training: (indices, labels) of batch j
    inputs: Callable[[np.ndarray], torch.Tensor]             # dataset indices → (augmented) model input
    forward: Callable[..., torch.Tensor]                     # the learner's forward, through DDP when distributed
    average_gradients: Callable[[nn.Module], None]           # across ranks (no-op in one process)
    average_tensors: Callable[[dict], dict]                  # across ranks, in place
    lr_factor: float = 1.0                                   # the schedule's factor at this step
    device: str = "cpu"


class MetaLearner(nn.Module):
    """Base of every algorithm. Subclasses set `embedder` and implement meta_learn and head_config."""

    embedder: Embedder
    applies_update: ClassVar[bool] = False  # True: meta_learn moves the parameters itself (no optimizer step)
    # True: meta_learn averages its gradients across ranks itself (step.average_gradients) instead of
    # calling step.forward, which DistributedDataParallel wraps
    syncs_own_gradients: ClassVar[bool] = False

    def meta_learn(self, step: Step) -> tuple[float, float]:
        """Forward and backward for one step; returns (mean loss, mean accuracy as a fraction)."""
        raise NotImplementedError

    def logits_from_embeddings(self, s: torch.Tensor, sy: torch.Tensor, q: torch.Tensor, n_way: int) -> torch.Tensor:
        """Query logits of an episode from its embeddings (learners with a frozen-embedding head)."""
        raise NotImplementedError

    def evaluation_logits(self, device: str = "cpu") -> tuple[LogitsFn, bool]:
        """(logits_fn, on_pixels): how this learner scores an evaluation episode. on_pixels=False:
        the protocol passes embeddings (the default, frozen-embedding heads); True: it passes the
        episode's images, which the learner adapts to (the gradient-based learners)."""
        def fn(s, sy, q, n_way):
            with torch.no_grad():
                t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
                return self.logits_from_embeddings(t(s), t(sy), t(q), n_way).cpu().numpy()
        return fn, False

    def head_config(self) -> dict:
        """The head recorded in the checkpoint (JSON form)."""
        raise NotImplementedError

    def deployable_state(self, calibration_batches: Callable[[], list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The weights a checkpoint ships. `calibration_batches()` gives training images, for
        learners that must recompute BatchNorm statistics."""
        return self.state_dict()


def episode_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the query logits and their accuracy (a fraction)."""
    return nn.functional.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def accumulate(step: Step, loss_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Backpropagate the mean of `meta_batch` losses one at a time (memory of one task at a time)."""
    loss_sum = acc_sum = 0.0
    for j in range(step.meta_batch):
        loss, acc = loss_of(j)
        (loss / step.meta_batch).backward()
        loss_sum += loss.item()
        acc_sum += acc.item()
    return loss_sum / step.meta_batch, acc_sum / step.meta_batch


def adaptation_logits_fn(model, device: str = "cpu") -> LogitsFn:
    """Episodes scored by the algorithm's own adaptation (MAML/FOMAML/Reptile fine-tune the network,
    ANIL the head) on PIXELS: evaluate_episodes is given uint8 images instead of embeddings."""
    from edgemeta.runtime.preprocess import pixels_to_batch

    def fn(support, support_labels, query, n_way):
        t = lambda a: torch.from_numpy(pixels_to_batch(a)).to(device)  # noqa: E731
        logits = model.logits_after_adaptation(t(support), torch.from_numpy(support_labels).to(device), t(query))
        return logits.cpu().numpy()
    return fn


_REGISTRY: dict[str, Callable[[Embedder, LearnerSettings], MetaLearner]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def list_algorithms() -> list[str]:
    return list(_REGISTRY)


def check_algorithm(name: str) -> None:
    """An unknown learner name raises ConfigError that lists the registered ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(_REGISTRY)}")


def create_algorithm(name: str, embedder: Embedder, settings: LearnerSettings | None = None) -> MetaLearner:
    """Build a registered learner by name; an unknown name raises ConfigError."""
    check_algorithm(name)
    return _REGISTRY[name](embedder, settings or LearnerSettings())
