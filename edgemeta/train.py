"""The training loop, the same for every MetaLearner: set-up (data, model, optimiser, resume,
distributed), one step (`MetaLearner.meta_learn`), the loop (schedule, log), and a validation hook
(fixed held-out episodes, best and last checkpoints). Progress goes to a runtime.progress.Progress."""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemeta.algorithms import LearnerSettings, MetaLearner, Step, check_algorithm, create_algorithm
from edgemeta.augment import augment_batch
from edgemeta.backbones import Embedder, fixed_normalisation
from edgemeta.checkpoint import load_checkpoint, save_checkpoint
from edgemeta.config import TrainConfig
from edgemeta.data import EpisodeSampler, ImageSet, load_dataset, select_split
from edgemeta.data.splits import read_split_file
from edgemeta.distributed import Distributed
from edgemeta.features import embed_pixels
from edgemeta.precision import autocast, native_bf16
from edgemeta.pretrained import load_pretrained
from edgemeta.protocol import evaluate_episodes
from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.malloc import retain_freed_memory
from edgemeta.runtime.preprocess import InputSpec, pixels_to_batch
from edgemeta.runtime.progress import SILENT, Progress

CALIBRATION_IMAGES = 1024  # training images that recompute BatchNorm statistics for shipping


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_accuracy: float | None  # None: the split file names no validation classes
    episodes: int
    seconds: float
    model: torch.nn.Module | None = None
    is_main: bool = True  # rank 0 (or a single process): the one that writes and reports


def load_splits(config: TrainConfig, progress: Progress = SILENT) -> tuple[ImageSet, ImageSet | None]:
    """The training classes, and the validation classes (None where the split file names none: a
    final run on every class there is, whose result is its last step)."""
    data = load_dataset(config.data, config.image_size, config.colour, config.layout, progress=progress)
    train = select_split(data, "train", config.split_mode, config.split_seed, config.split_file)
    if config.split_file and not read_split_file(config.split_file)["val"]:
        return train, None
    return train, select_split(data, "val", config.split_mode, config.split_seed, config.split_file)


def build_model(config: TrainConfig, spec: InputSpec, n_train_classes: int = 0) -> MetaLearner:
    embedder = Embedder(config.backbone, spec, config.backbone_args, channels_last=config.switch("channels_last"))
    pretrained: dict = {}
    if config.pretrained:
        pretrained = load_pretrained(config.backbone, embedder.backbone)
    if config.init:
        init = load_checkpoint(config.init)
        if init.meta["backbone"]["name"] != config.backbone:
            raise ConfigError(f"--init {config.init} holds a {init.meta['backbone']['name']} backbone, not {config.backbone}")
        embedder.load_state_dict(init.embedder_state())
        pretrained = init.meta.get("pretrained", {})
    if config.freeze_blocks or config.freeze_bn:
        embedder.freeze(config.freeze_blocks, config.freeze_bn)
    learner = create_algorithm(config.algo, embedder, LearnerSettings.from_train_config(config, n_train_classes))
    learner.pretrained = pretrained  # where the starting weights came from: every checkpoint records it
    return learner


def lr_factor(config: TrainConfig, step: int) -> float:
    if config.lr_schedule == "cosine":
        if not config.episodes:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, config.episodes) / config.episodes))
    if config.lr_schedule == "step":
        return 0.5 ** (step // config.lr_step)
    return 1.0


def _optimizer(config: TrainConfig, model: MetaLearner) -> torch.optim.Optimizer:
    """Two parameter groups: the backbone at lr × backbone_lr_scale, the rest (heads, scales) at lr.
    Each group keeps its `lr_scale`, which the schedule multiplies."""
    backbone = {id(p) for p in model.embedder.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in backbone], "lr_scale": config.backbone_lr_scale},
              {"params": [p for p in trainable if id(p) not in backbone], "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = config.lr * g["lr_scale"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


class TrainInputs:
    """Dataset indices → (augmented) model input on the device, seeded per step; the episodes and
    image batches of each step. What a Step is made from."""

    def __init__(self, data: ImageSet, config: TrainConfig, dist: Distributed):
        self.data, self.config, self.dist = data, config, dist
        self.sampler = None
        from edgemeta.config import IMAGE_BATCH_ALGORITHMS
        if config.algo not in IMAGE_BATCH_ALGORITHMS:
            self.sampler = EpisodeSampler(data.labels, config.way, config.shot, config.query, config.seed + dist.rank,
                                          class_names=data.classes)
        elif config.batch_size > len(data):
            raise ConfigError(f"batch size {config.batch_size} exceeds the {len(data)} training images")

    def inputs(self, idx: np.ndarray, step: int) -> torch.Tensor:
        x = torch.from_numpy(pixels_to_batch(self.data.pixels[idx]))
        if self.config.augment:
            x = augment_batch(x, torch.Generator().manual_seed(self.config.seed * 1_000_003 + step),
                              pad=self.config.augment_pad)
        return x.to(self.config.device)

    def episodes(self, step: int) -> list:
        first = self.dist.episode_index(step, self.config.meta_batch)
        return [self.sampler.episode(first + j) for j in range(self.config.meta_batch)]

    def images(self, step: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.random.default_rng([self.config.seed, step, j]).choice(len(self.data), self.config.batch_size,
                                                                         replace=False)
        return idx, self.data.labels[idx]

    def step(self, index: int, forward, learner: MetaLearner) -> Step:
        c = self.config
        return Step(index=index, meta_batch=c.meta_batch, way=c.way, episodes=lambda: self.episodes(index),
                    images=lambda j: self.images(index, j), inputs=lambda idx: self.inputs(idx, index),
                    forward=forward, average_gradients=self.dist.average_gradients,
                    average_tensors=self.dist.average_tensors, lr_factor=lr_factor(c, index), device=c.device)

    def calibration_batches(self) -> list[torch.Tensor]:
        idx = np.random.default_rng(self.config.seed).choice(len(self.data), min(CALIBRATION_IMAGES, len(self.data)),
                                                             replace=False)
        return [torch.from_numpy(pixels_to_batch(self.data.pixels[idx[i:i + 128]])).to(self.config.device)
                for i in range(0, len(idx), 128)]


def validation_accuracy(model: MetaLearner, val: ImageSet, config: TrainConfig) -> float:
    """Accuracy (%) on fixed validation episodes, with the learner's own way of scoring an episode
    (eval mode; the gradient-based learners adapt on the episode's images)."""
    logits_fn, on_pixels = model.evaluation_logits(config.device)
    data = val.pixels if on_pixels else embed_pixels(model.embedder, val.pixels, device=config.device)
    return evaluate_episodes(data, val.labels, logits_fn, config.val_way, config.val_shot, config.val_query,
                             config.val_episodes, seed=config.seed + 1).accuracy


def checkpoint_meta(config: TrainConfig, model: MetaLearner, spec: InputSpec, metrics: dict, step: int,
                    train_classes: int) -> dict:
    return {
        "backbone": {"name": config.backbone, "args": config.backbone_args},
        "input": spec.to_dict(),
        "embedding_dim": model.embedder.embed_dim,
        "normalize_embedding": False,
        "algorithm": config.algo,
        "head": model.head_config(),
        "train_config": config.to_dict(),
        "train_classes": train_classes,
        "pretrained": getattr(model, "pretrained", {}),
        "metrics": metrics,
        "episode": step,
    }


@dataclass
class _Run:
    """Everything the loop needs, made by _set_up."""

    config: TrainConfig
    model: MetaLearner
    forward: torch.nn.Module          # the model, wrapped by DistributedDataParallel when distributed
    optimizer: torch.optim.Optimizer
    inputs: TrainInputs
    val: ImageSet | None              # None: no validation classes; every save is the result
    spec: InputSpec
    dist: Distributed
    out: Path
    start: int = 0
    best: float = -1.0

    @property
    def best_path(self) -> Path:
        return self.out / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.out / "last.safetensors"

    @property
    def log_path(self) -> Path:
        return self.out / "metrics.jsonl"


def _set_up(config: TrainConfig, resume: bool, progress: Progress) -> _Run:
    """Check, load the data, build (or resume) the model and optimiser; the run folder is made only
    once the data has loaded."""
    config.validate()
    check_algorithm(config.algo)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if config.precision == "bf16" and not native_bf16(config.device):
        warnings.warn(f"--precision bf16: this {config.device} has no native bfloat16 arithmetic; "
                      "training works but runs slower than fp32", stacklevel=3)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    retain_freed_memory()
    torch.manual_seed(config.seed)
    train_set, val_set = load_splits(config, progress)
    if config.rotations:
        train_set = train_set.with_rotations()
    last = out / "last.safetensors"
    ckpt = load_checkpoint(last) if resume and last.exists() else None
    if ckpt is not None:
        spec = ckpt.spec
    else:
        mean, std = fixed_normalisation(config.backbone) or train_set.channel_stats()
        spec = InputSpec(config.image_size, config.image_size, config.colour, mean, std)
    model = build_model(config, spec, train_set.n_classes).to(config.device)
    dist = Distributed(config.device)
    inputs = TrainInputs(train_set, config, dist)
    if val_set is not None:  # fail before training, not at the first validation, when they are too small
        EpisodeSampler(val_set.labels, config.val_way, config.val_shot, config.val_query, 0, class_names=val_set.classes)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(config, model, model, _optimizer(config, model), inputs, val_set, spec, dist, out)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            run.optimizer.load_state_dict(ckpt.optimizer_state)
        run.start, run.best = ckpt.meta["episode"], ckpt.meta["metrics"].get("best_val_accuracy", -1.0)
    elif run.log_path.exists():
        run.log_path.unlink()
    if dist.enabled and config.switch("channels_last"):
        # parameters in the layout their gradients arrive in (NHWC activations give NHWC weight
        # gradients): DistributedDataParallel's buckets then match, with no copy per bucket
        model.to(memory_format=torch.channels_last)
    dist.broadcast(model)
    if not model.syncs_own_gradients:
        run.forward = dist.wrap(model)  # DistributedDataParallel averages the gradients of the forward
    return run


def _train_step(run: _Run, step: int, precision) -> tuple[float, float]:
    """One optimiser step: the learner's meta_learn, then the optimizer (unless the learner applies
    its own update)."""
    run.model.train()
    for group in run.optimizer.param_groups:
        group["lr"] = run.config.lr * group.get("lr_scale", 1.0) * lr_factor(run.config, step)
    run.optimizer.zero_grad(set_to_none=True)
    with precision:
        loss, acc = run.model.meta_learn(run.inputs.step(step, run.forward, run.model))
    if not run.model.applies_update:
        run.optimizer.step()
    return loss, acc


def _validate_and_save(run: _Run, done: int) -> dict:
    """The validation hook: accuracy on the fixed validation episodes; the best checkpoint (what
    ships) when it improved, and the last one (for --resume) always. Without validation classes the
    best checkpoint is the last step's. Returns what the metrics log records: {"val_acc": …} or {}."""
    c = run.config
    if run.val is None:
        val_acc, improved = None, True
        metrics: dict = {"val_protocol": "none: the split file names no validation classes"}
    else:
        val_acc = validation_accuracy(run.model, run.val, c)
        improved = val_acc > run.best
        run.best = max(run.best, val_acc)
        metrics = {"best_val_accuracy": run.best, "val_accuracy": val_acc,
                   "val_protocol": f"{c.val_way}-way {c.val_shot}-shot, {c.val_episodes} episodes"}
    meta = checkpoint_meta(c, run.model, run.spec, metrics, done, run.inputs.data.n_classes)
    if improved:
        save_checkpoint(run.best_path, run.model.deployable_state(run.inputs.calibration_batches), meta)
    save_checkpoint(run.last_path, run.model.state_dict(), meta, run.optimizer.state_dict())
    return {} if val_acc is None else {"val_acc": val_acc}


def train(config: TrainConfig, resume: bool = False, progress: Progress = SILENT) -> TrainResult:
    """Train as `config` says. The process keeps its freed heap memory from here on
    (edgemeta.runtime.malloc): no page faults per step, resident size stays at its peak."""
    run = _set_up(config, resume, progress)
    c = run.config
    precision = autocast(c.precision, c.device)
    show = progress if run.dist.is_main else SILENT
    t0 = time.time()
    window_loss, window_acc = [], []
    show.start("train", c.episodes, run.start)
    for step in range(run.start, c.episodes):
        loss, acc = _train_step(run, step, precision)
        window_loss.append(loss)
        window_acc.append(100 * acc)
        done = step + 1
        record = None
        if done % c.log_every == 0 or done == c.episodes:
            record = {"episode": done, "loss": float(np.mean(window_loss)), "train_acc": float(np.mean(window_acc)),
                      "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
            window_loss, window_acc = [], []
        if run.dist.is_main and (done % c.val_every == 0 or done == c.episodes):
            record = {**(record or {"episode": done}), **_validate_and_save(run, done)}
        if record is not None and run.dist.is_main:
            with open(run.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        show.update(done, _note(record))
    if c.episodes == 0 and run.dist.is_main:
        # a pretrained (or --init) network as it starts: validated and saved like a trained one,
        # the off-the-shelf row every fine-tuning is compared with
        record = {"episode": 0, **_validate_and_save(run, 0)}
        with open(run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    show.finish()
    run.forward = run.model  # the DistributedDataParallel wrapper goes before the group does (Distributed.close)
    run.dist.close(run.model)
    best = run.best if run.val is not None else None
    return TrainResult(run.best_path, run.last_path, best, c.episodes, time.time() - t0, run.model,
                       is_main=run.dist.is_main)


def _note(record: dict | None) -> str:
    if record is None:
        return ""
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items() if k in ("loss", "train_acc", "val_acc"))
