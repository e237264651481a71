"""Supervised pre-training for a frozen embedding (Tian et al. 2020, "Rethinking few-shot image
classification: a good embedding is all you need"; the first stage of Meta-Baseline, Chen et al.
2021): a linear classifier over all training classes on top of the backbone, thrown away after
training. The embedding is then used with the device heads; its default head is the cosine
prototype classifier (Meta-Baseline), which an episodic fine-tune (`--algo protonet --metric
cosine --init CKPT`) can sharpen.

The classifier is linear, or with classifier = "cosine" a learned scale times the cosine between
the embedding and each class's weight vector (Baseline++, Chen et al. 2019, "A closer look at
few-shot classification"): the embedding is then trained for the cosine the deployed prototype
head measures.

With rotation_weight > 0, a second linear head predicts by how many quarter turns each image of a
rotated copy of the batch was rotated (self-supervision as an auxiliary loss: Gidaris et al. 2019,
"Boosting few-shot visual learning with self-supervision"); it is thrown away with the classifier.

With mixup > 0, each batch is mixed with a shuffled copy of itself, λ·x + (1 − λ)·x[perm] with λ
drawn from Beta(mixup, mixup), and the loss is λ·CE(y) + (1 − λ)·CE(y[perm]) (Zhang et al. 2018,
"mixup: beyond empirical risk minimization"; as input mixup in S2M2, Mangla et al. 2020, for
few-shot embeddings)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.config import IMAGE_BATCH_ALGORITHMS
from edgemeta.heads import class_means, prototype_logits

from .base import LearnerSettings, MetaLearner, Step, accumulate, episode_loss, register

COSINE_SCALE = 10.0


@register("pretrain")
def _pretrain(embedder: Embedder, s: LearnerSettings) -> Pretrain:
    return Pretrain(embedder, s.n_classes, s.rotation_weight, s.classifier, s.mixup)


class CosineClassifier(nn.Module):
    """Logits = a learned scale × cos(embedding, class weight vector) (Baseline++)."""

    def __init__(self, dim: int, n_classes: int, scale: float = COSINE_SCALE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cosine = nn.functional.normalize(z, dim=1) @ nn.functional.normalize(self.weight, dim=1).T
        return self.log_scale.exp() * cosine


def build_classifier(kind: str, dim: int, n_classes: int) -> nn.Module:
    """The classifier over the training classes (TrainConfig.classifier): linear or cosine."""
    return CosineClassifier(dim, n_classes) if kind == "cosine" else nn.Linear(dim, n_classes)


class MixedLabels:
    """A batch's labels: y, or with mixup λ of y and 1 − λ of the shuffled copy's labels."""

    def __init__(self, y: torch.Tensor, other: torch.Tensor | None = None, lam: float = 1.0):
        self.y, self.other, self.lam = y, other, lam

    def loss(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy (a fraction), each weighted as the images were mixed."""
        loss, acc = episode_loss(logits, self.y)
        if self.other is None:
            return loss, acc
        loss2, acc2 = episode_loss(logits, self.other)
        return self.lam * loss + (1 - self.lam) * loss2, self.lam * acc + (1 - self.lam) * acc2


class Pretrain(MetaLearner):
    def __init__(self, embedder: Embedder, n_classes: int, rotation_weight: float = 0.0, classifier: str = "linear",
                 mixup: float = 0.0):
        super().__init__()
        self.embedder = embedder
        self.classifier = build_classifier(classifier, embedder.embed_dim, n_classes)
        self.rotation_weight = rotation_weight
        self.mixup = mixup
        if rotation_weight > 0:
            self.rotation_head = nn.Linear(embedder.embed_dim, 4)

    def forward(self, x: torch.Tensor, rotated: torch.Tensor | None = None):
        """Logits over the training classes; with `rotated`, also the rotation logits of that batch
        (one forward, so DistributedDataParallel can wrap it)."""
        logits = self.classifier(self.embedder(x))
        if rotated is None:
            return logits
        return logits, self.rotation_head(self.embedder(rotated))

    def _logits_and_aux(self, step: Step, x: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Class logits, and the weighted rotation loss (0.0 when off)."""
        if not self.rotation_weight:
            return step.forward(x), 0.0
        turns = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(step.index * 1009 + j))
        rotated = x.clone()
        for k in range(1, 4):
            chosen = (turns == k).nonzero().flatten().to(x.device)
            rotated[chosen] = torch.rot90(x[chosen], k, dims=(2, 3))
        logits, rotation_logits = step.forward(x, rotated)
        aux = nn.functional.cross_entropy(rotation_logits, turns.to(x.device))
        return logits, self.rotation_weight * aux

    def _batch(self, step: Step, j: int) -> tuple[torch.Tensor, MixedLabels]:
        """Image batch j and its labels; with mixup, mixed with a shuffled copy of itself."""
        idx, labels = step.images(j)
        x, y = step.inputs(idx), torch.from_numpy(labels).to(step.device)
        if not self.mixup:
            return x, MixedLabels(y)
        seed = 1_000_003 + step.index * 1009 + j  # apart from the rotations' seeds
        lam = float(np.random.default_rng(seed).beta(self.mixup, self.mixup))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
        return lam * x + (1 - lam) * x[perm], MixedLabels(y, y[perm], lam)

    def meta_learn(self, step: Step) -> tuple[float, float]:
        def loss_of(j):
            x, y = self._batch(step, j)
            logits, aux = self._logits_and_aux(step, x, j)
            loss, acc = y.loss(logits)
            return loss + aux, acc
        return accumulate(step, loss_of)

    def logits_from_embeddings(self, s, support_y, q, n_way):
        return prototype_logits(q, class_means(s, support_y, n_way), "cosine", COSINE_SCALE)

    def head_config(self) -> dict:
        return {"kind": "prototype", "metric": "cosine", "scale": COSINE_SCALE}

    def deployable_state(self, calibration_batches=None) -> dict[str, torch.Tensor]:
        """The weights worth shipping: the classifier over training classes (and a teacher) are thrown away."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("classifier.", "teacher.", "rotation_head."))}


@register("distill")
def _distill(embedder: Embedder, s: LearnerSettings) -> Distill:
    return Distill(embedder, s.n_classes, s.teacher, s.distill_alpha, s.distill_temperature, s.rotation_weight,
                   s.classifier, s.mixup)


class Distill(Pretrain):
    """Self-distillation (RFS, Tian et al. 2020; born-again networks): pre-training again, the loss a
    mix of the labels' cross-entropy and the KL divergence to a trained teacher's softened logits,
    α·T²·KL(teacher/T ‖ student/T) + (1 − α)·CE. The teacher is a pre-training run's
    last.safetensors (it keeps its classifier over the training classes); it never trains."""

    def __init__(self, embedder: Embedder, n_classes: int, teacher: str, alpha: float = 0.5, temperature: float = 4.0,
                 rotation_weight: float = 0.0, classifier: str = "linear", mixup: float = 0.0):
        super().__init__(embedder, n_classes, rotation_weight, classifier, mixup)
        from edgemeta.checkpoint import load_checkpoint
        from edgemeta.runtime.errors import ConfigError
        if not teacher:
            raise ConfigError("--algo distill needs a teacher: teacher = \"RUN/last.safetensors\" of a pretrain run")
        ckpt = load_checkpoint(teacher)
        head = {k[len("classifier."):]: v for k, v in ckpt.model_state.items() if k.startswith("classifier.")}
        kind = ckpt.meta.get("train_config", {}).get("classifier", "linear")
        expected = set(build_classifier(kind, 1, 1).state_dict())  # the parameter names of that kind
        if ckpt.meta.get("algorithm") not in IMAGE_BATCH_ALGORITHMS or set(head) != expected:
            raise ConfigError(f"teacher {teacher} has no classifier over the training classes; use the pretrain "
                              "run's last.safetensors (best.safetensors ships without it)")
        if head["weight"].shape[0] != n_classes:
            raise ConfigError(f"teacher {teacher} knows {head['weight'].shape[0]} classes, the data has {n_classes}")
        model = Pretrain(ckpt.build_embedder(), n_classes, classifier=kind)
        model.classifier.load_state_dict(head)
        self.teacher = model.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm keeps its statistics
        return self

    def meta_learn(self, step: Step) -> tuple[float, float]:
        import torch.nn.functional as F
        t = self.temperature

        def loss_of(j):
            x, y = self._batch(step, j)
            logits, aux = self._logits_and_aux(step, x, j)
            with torch.no_grad():
                soft = F.softmax(self.teacher(x) / t, dim=1)
            kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean") * t * t
            ce, acc = y.loss(logits)
            return self.alpha * kd + (1 - self.alpha) * ce + aux, acc
        return accumulate(step, loss_of)
