"""Supervised pre-training for a frozen embedding (Tian et al. 2020, "Rethinking few-shot image
classification: a good embedding is all you need"; the first stage of Meta-Baseline, Chen et al.
2021): a linear classifier over all training classes on top of the backbone, thrown away after
training. The embedding is then used with the device heads; its default head is the cosine
prototype classifier (Meta-Baseline), which an episodic fine-tune (`--algo protonet --metric
cosine --init CKPT`) can sharpen."""
from __future__ import annotations

import torch
from torch import nn

from edgemeta.backbones import Embedder
from edgemeta.heads import class_means, prototype_logits

from .base import LearnerSettings, MetaLearner, Step, accumulate, episode_loss, register

COSINE_SCALE = 10.0


@register("pretrain")
def _pretrain(embedder: Embedder, s: LearnerSettings) -> "Pretrain":
    return Pretrain(embedder, s.n_classes)


class Pretrain(MetaLearner):
    def __init__(self, embedder: Embedder, n_classes: int):
        super().__init__()
        self.embedder = embedder
        self.classifier = nn.Linear(embedder.embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the training classes (forward, so DistributedDataParallel can wrap it)."""
        return self.classifier(self.embedder(x))

    def meta_learn(self, step: Step) -> tuple[float, float]:
        def loss_of(j):
            idx, labels = step.images(j)
            return episode_loss(step.forward(step.inputs(idx)), torch.from_numpy(labels).to(step.device))
        return accumulate(step, loss_of)

    def logits_from_embeddings(self, s, support_y, q, n_way):
        return prototype_logits(q, class_means(s, support_y, n_way), "cosine", COSINE_SCALE)

    def head_config(self) -> dict:
        return {"kind": "prototype", "metric": "cosine", "scale": COSINE_SCALE}

    def deployable_state(self, calibration_batches=None) -> dict[str, torch.Tensor]:
        """The weights worth shipping: the classifier over training classes is thrown away."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}
