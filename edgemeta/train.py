"""The episodic training loop: Adam, LR schedule, validation on held-out classes with fixed
episodes, best and last checkpoints, resume, rich progress, JSONL metrics."""
from __future__ import annotations

import functools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgemeta.algorithms import ALGORITHMS, GRADIENT_ALGORITHMS, create_algorithm
from edgemeta.algorithms.gradient import recalibrate_batchnorm, stack_tasks
from edgemeta.augment import augment_batch
from edgemeta.backbones import Embedder
from edgemeta.checkpoint import load_checkpoint, save_checkpoint
from edgemeta.config import TrainConfig
from edgemeta.data import EpisodeSampler, ImageSet, load_dataset, select_split
from edgemeta.evaluate import adaptation_logits_fn, embed_pixels
from edgemeta.memory import retain_freed_memory
from edgemeta.precision import autocast, native_bf16
from edgemeta.protocol import evaluate_episodes
from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.preprocess import InputSpec, pixels_to_batch


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_accuracy: float
    episodes: int
    seconds: float
    model: torch.nn.Module | None = None


def load_splits(config: TrainConfig, progress: bool = False) -> tuple[ImageSet, ImageSet]:
    data = load_dataset(config.data, config.image_size, config.colour, config.layout, progress=progress)
    train = select_split(data, "train", config.split_mode, config.split_seed, config.split_file)
    val = select_split(data, "val", config.split_mode, config.split_seed, config.split_file)
    return train, val


def build_model(config: TrainConfig, spec: InputSpec, n_train_classes: int = 0) -> torch.nn.Module:
    embedder = Embedder(config.backbone, spec, config.backbone_args, channels_last=config.switch("channels_last"))
    if config.init:
        init = load_checkpoint(config.init)
        if init.meta["backbone"]["name"] != config.backbone:
            raise ConfigError(f"--init {config.init} holds a {init.meta['backbone']['name']} backbone, not {config.backbone}")
        embedder.load_state_dict(init.embedder_state())
    return create_algorithm(config.algo, embedder, metric=config.metric, ridge_lambda=config.ridge_lambda,
                            n_classes=n_train_classes, n_way=config.way, inner_steps=config.inner_steps,
                            inner_lr=config.inner_lr, learn_inner_lr=config.learn_inner_lr,
                            reptile_epsilon=config.reptile_epsilon,
                            vectorize=config.switch("vectorize"))


def _lr_factor(config: TrainConfig, step: int) -> float:
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, config.episodes) / config.episodes))
    if config.lr_schedule == "step":
        return 0.5 ** (step // config.lr_step)
    return 1.0


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


class _Batches:
    """Turns dataset indices into (augmented) model input on the device; seeded per step."""

    def __init__(self, data: ImageSet, config: TrainConfig):
        self.data, self.config = data, config

    def __call__(self, idx: np.ndarray, step: int) -> torch.Tensor:
        x = torch.from_numpy(pixels_to_batch(self.data.pixels[idx]))
        if self.config.augment:
            x = augment_batch(x, torch.Generator().manual_seed(self.config.seed * 1_000_003 + step))
        return x.to(self.config.device)


def _episode_loss(model, batches: _Batches, sampler: EpisodeSampler, config: TrainConfig, step: int, j: int):
    ep = sampler.episode(step * config.meta_batch + j)
    sy = torch.from_numpy(ep.support_labels).to(config.device)
    qy = torch.from_numpy(ep.query_labels).to(config.device)
    logits = model(batches(ep.support, step), sy, batches(ep.query, step), config.way)
    return F.cross_entropy(logits, qy), (logits.argmax(1) == qy).float().mean()


def _pretrain_loss(model, batches: _Batches, labels: np.ndarray, config: TrainConfig, step: int, j: int):
    idx = np.random.default_rng([config.seed, step, j]).choice(len(labels), config.batch_size, replace=False)
    y = torch.from_numpy(labels[idx]).to(config.device)
    logits = model(batches(idx, step))
    return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()


def _meta_step(model, batches: _Batches, sampler: EpisodeSampler, config: TrainConfig, dist: "_Distributed", step: int):
    """Gradient-based algorithms: one vectorised meta-batch; gradients (or Reptile's direction)
    are averaged across ranks."""
    first = dist.episode_index(step, config.meta_batch)
    episodes = [sampler.episode(first + j) for j in range(config.meta_batch)]
    sx, sy, qx, qy = stack_tasks(episodes, lambda idx: batches(idx, step))
    sy, qy = sy.to(config.device), qy.to(config.device)
    if getattr(model, "applies_update", False):
        loss, acc = model.meta_step(sx, sy, qx, qy, epsilon=config.reptile_epsilon * _lr_factor(config, step),
                                    reduce=dist.average_dict)
    else:
        loss, acc = model.meta_step(sx, sy, qx, qy)
        dist.average_gradients(model)
    return loss, acc


class _Distributed:
    """torchrun / DistributedDataParallel plumbing: gloo on CPU, nccl on GPU; each rank draws its
    own episodes; only rank 0 writes checkpoints and logs. A no-op in a single process."""

    def __init__(self, config: TrainConfig):
        import os
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled:
            import torch.distributed as td
            if not td.is_initialized():
                td.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
            self.td = td

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def episode_index(self, step: int, per_rank: int) -> int:
        return (step * self.world + self.rank) * per_rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)

    def broadcast(self, model: torch.nn.Module) -> None:
        if self.enabled:
            for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
                self.td.broadcast(t.data, 0)

    def average_gradients(self, model: torch.nn.Module) -> None:
        if self.enabled:
            for p in model.parameters():
                if p.grad is not None:
                    self.td.all_reduce(p.grad)
                    p.grad /= self.world

    def average_dict(self, tensors: dict) -> dict:
        if self.enabled:
            for t in tensors.values():
                self.td.all_reduce(t)
                t /= self.world
        return tensors

    def close(self, model: torch.nn.Module) -> None:
        if self.enabled:
            # DDP syncs BatchNorm statistics from rank 0 at each forward; the last forward's update is
            # local, so end with rank 0's statistics everywhere (what the checkpoint holds).
            self.broadcast(model)
            self.td.barrier()
            self.td.destroy_process_group()


def validate(model: torch.nn.Module, val: ImageSet, config: TrainConfig) -> float:
    """Accuracy (%) on fixed validation episodes, with the algorithm's own head and its own
    BatchNorm convention (eval mode; batch statistics per task for the gradient-based ones)."""
    if hasattr(model, "logits_after_adaptation"):
        return evaluate_episodes(val.pixels, val.labels, adaptation_logits_fn(model, config.device), config.val_way,
                                 config.val_shot, config.val_query, config.val_episodes, seed=config.seed + 1).accuracy
    emb = embed_pixels(model.embedder, val.pixels, device=config.device)

    def logits_fn(s, sy, q, n_way):
        with torch.no_grad():
            t = lambda a: torch.from_numpy(a).to(config.device)  # noqa: E731
            return model.logits_from_embeddings(t(s), t(sy), t(q), n_way).cpu().numpy()

    return evaluate_episodes(emb, val.labels, logits_fn, config.val_way, config.val_shot, config.val_query,
                             config.val_episodes, seed=config.seed + 1).accuracy


def checkpoint_meta(config: TrainConfig, model: torch.nn.Module, spec: InputSpec, metrics: dict, step: int,
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
        "metrics": metrics,
        "episode": step,
    }


def deployable_state(model: torch.nn.Module, train_set: ImageSet, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a checkpoint ships: no pre-training classifier; for algorithms meta-trained with
    batch statistics, BatchNorm running statistics recomputed on training images."""
    state = model.deployable_state() if hasattr(model, "deployable_state") else model.state_dict()
    if config.algo in GRADIENT_ALGORITHMS:
        idx = np.random.default_rng(config.seed).choice(len(train_set), min(1024, len(train_set)), replace=False)
        batches = [torch.from_numpy(pixels_to_batch(train_set.pixels[idx[i:i + 128]])).to(config.device)
                   for i in range(0, len(idx), 128)]
        state = {**state, **{f"embedder.{k}": v for k, v in recalibrate_batchnorm(model.embedder, batches).items()}}
    return state


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `config` says. The process keeps its freed heap memory from here on
    (edgemeta.memory): no page faults per step, resident size stays at its peak."""
    config.validate()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if config.precision == "bf16" and not native_bf16(config.device):
        warnings.warn(f"--precision bf16: this {config.device} has no native bfloat16 arithmetic; "
                      "training works but runs slower than fp32", stacklevel=2)
    retain_freed_memory()
    torch.manual_seed(config.seed)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the run")
    last_path, best_path, log_path = out / "last.safetensors", out / "best.safetensors", out / "metrics.jsonl"

    train_set, val_set = load_splits(config, progress)  # bad data fails here, before the run folder exists
    out.mkdir(parents=True, exist_ok=True)
    if config.rotations:
        train_set = train_set.with_rotations()
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        spec = ckpt.spec
    else:
        ckpt = None
        mean, std = train_set.channel_stats()
        spec = InputSpec(config.image_size, config.image_size, config.colour, mean, std)
    model = build_model(config, spec, train_set.n_classes).to(config.device)
    dist = _Distributed(config)
    optimizer = _optimizer(config, model)
    start, best = 0, -1.0
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        start, best = ckpt.meta["episode"], ckpt.meta["metrics"].get("best_val_accuracy", -1.0)
    elif log_path.exists():
        log_path.unlink()

    dist.broadcast(model)
    batches = _Batches(train_set, config)
    meta_step = None
    if config.algo == "pretrain":
        if config.batch_size > len(train_set):
            raise ConfigError(f"batch size {config.batch_size} exceeds the {len(train_set)} training images")
        step_loss = functools.partial(_pretrain_loss, dist.wrap(model), batches, train_set.labels, config)
    else:
        sampler = EpisodeSampler(train_set.labels, config.way, config.shot, config.query, config.seed + dist.rank,
                                 class_names=train_set.classes)
        if config.algo in GRADIENT_ALGORITHMS:  # functional meta-gradients, averaged by _Distributed
            meta_step = functools.partial(_meta_step, model, batches, sampler, config, dist)
        else:  # module forward: DistributedDataParallel averages the gradients
            step_loss = functools.partial(_episode_loss, dist.wrap(model), batches, sampler, config)
    # Fail before training, not at the first validation, when the validation classes are too small.
    EpisodeSampler(val_set.labels, config.val_way, config.val_shot, config.val_query, 0, class_names=val_set.classes)
    precision = autocast(config.precision, config.device)
    t0 = time.time()
    bar = _Bar(progress and dist.is_main, config.episodes, start)
    window_loss, window_acc = [], []
    with bar:
        for step in range(start, config.episodes):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(config, step)
            optimizer.zero_grad(set_to_none=True)
            if meta_step is not None:
                with precision:
                    loss, acc = meta_step(step)
                loss_sum, acc_sum = loss.item() * config.meta_batch, acc.item() * config.meta_batch
            else:
                loss_sum, acc_sum = 0.0, 0.0
                for j in range(config.meta_batch):
                    with precision:
                        loss, acc = step_loss(step, j)
                    (loss / config.meta_batch).backward()
                    loss_sum += loss.item()
                    acc_sum += acc.item()
            if not getattr(model, "applies_update", False):
                optimizer.step()
            window_loss.append(loss_sum / config.meta_batch)
            window_acc.append(100 * acc_sum / config.meta_batch)
            done = step + 1
            record = None
            if done % config.log_every == 0 or done == config.episodes:
                record = {"episode": done, "loss": float(np.mean(window_loss)), "train_acc": float(np.mean(window_acc)),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
                window_loss, window_acc = [], []
            if dist.is_main and (done % config.val_every == 0 or done == config.episodes):
                val_acc = validate(model, val_set, config)
                record = {**(record or {"episode": done}), "val_acc": val_acc}
                improved = val_acc > best
                best = max(best, val_acc)
                metrics = {"best_val_accuracy": best, "val_accuracy": val_acc,
                           "val_protocol": f"{config.val_way}-way {config.val_shot}-shot, {config.val_episodes} episodes"}
                meta = checkpoint_meta(config, model, spec, metrics, done, train_set.n_classes)
                if improved:
                    save_checkpoint(best_path, deployable_state(model, train_set, config), meta)
                save_checkpoint(last_path, model.state_dict(), meta, optimizer.state_dict())
            if record is not None and dist.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.update(done, record)
    dist.close(model)
    return TrainResult(best_path, last_path, best, config.episodes, time.time() - t0, model)


class _Bar:
    """rich progress with the latest loss / accuracy in the description; silent when disabled."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=self.total, completed=self.start)
        return self

    def update(self, done: int, record: dict | None) -> None:
        if not self.enabled:
            return
        kw = {}
        if record is not None:
            kw["description"] = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in record.items() if k in ("loss", "train_acc", "val_acc"))
        self.progress.update(self.task, completed=done, **kw)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
