"""Training-side commands: train, eval, inspect."""
from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
from pathlib import Path
from typing import Optional

import click
import typer
from rich.table import Table

from edgemeta.cli.common import RichProgress, command, console, print_json, require_training_extra
from edgemeta.data.splits import SPLIT_MODES, SPLITS
from edgemeta.runtime.bundle import VARIANTS
from edgemeta.runtime.heads import head_names


def _train(config: Optional[Path] = None, resume: bool = False, quiet: bool = False, **settings):
    """Meta-train a backbone on episodes; keeps the best checkpoint on the validation classes.

    Every TrainConfig setting is an option (its default is the config file's value, else TrainConfig's);
    `backbone_args` is set in the TOML file."""
    require_training_extra()
    from edgemeta.config import TrainConfig
    from edgemeta.train import train as run_training

    flags = {k: ([str(p) for p in v] if isinstance(v, list) else v) for k, v in settings.items() if v is not None}
    cfg = TrainConfig.from_toml(config, **flags) if config else TrainConfig.from_dict(flags)
    result = run_training(cfg, resume=resume, progress=RichProgress(enabled=not quiet))
    if not result.is_main:
        return  # under torchrun only rank 0 reports
    if result.best_val_accuracy is None:
        console.print(f"trained on every class (the split file names no validation classes) in {result.seconds:.0f} s")
    else:
        console.print(f"best validation accuracy {result.best_val_accuracy:.2f}% "
                      f"({cfg.val_way}-way {cfg.val_shot}-shot) in {result.seconds:.0f} s")
    console.print(f"checkpoint: {result.best_checkpoint}")


def _train_signature() -> pyinspect.Signature:
    """The train command's options, derived from TrainConfig's fields and their help (edgemeta.config):
    one declaration per setting. Every option defaults to None (= not given: the config file's value,
    else TrainConfig's default)."""
    from edgemeta.config import CLI_EXCLUDED, HELP, TrainConfig
    kinds = {"bool": Optional[bool], "int": Optional[int], "float": Optional[float], "str": Optional[str],
             "list[str]": Optional[list[str]]}
    keyword = pyinspect.Parameter.KEYWORD_ONLY
    params = [pyinspect.Parameter("config", keyword, annotation=Optional[Path],
                                default=typer.Option(None, help="TOML file with any of these settings; flags override it."))]
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_EXCLUDED:
            continue
        params.append(pyinspect.Parameter(f.name, keyword, annotation=kinds[str(f.type)],
                                        default=typer.Option(None, help=HELP[f.name])))
    params += [pyinspect.Parameter("resume", keyword, annotation=bool,
                                 default=typer.Option(False, help="Continue from OUT/last.safetensors.")),
               pyinspect.Parameter("quiet", keyword, annotation=bool, default=typer.Option(False, help="No progress bar."))]
    return pyinspect.Signature(params)


_train.__signature__ = _train_signature()  # type: ignore[attr-defined]
train = command("train")(_train)


@command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint (.safetensors) from `edgemeta train`."),
    bundle: Optional[Path] = typer.Option(None, help="Evaluate a bundle through the deployed path (ONNX Runtime + NumPy head) instead."),
    variant: str = typer.Option("fp32", click_type=click.Choice(VARIANTS), help="With --bundle: the bundle's graph."),
    data: Optional[list[Path]] = typer.Option(None, help="Folder or .zip of images; default: the data the checkpoint trained on."),
    split: str = typer.Option("test", click_type=click.Choice(SPLITS), help="Classes of the checkpoint's split."),
    split_mode: Optional[str] = typer.Option(None, click_type=click.Choice(SPLIT_MODES), help="Override the split mode."),
    split_file: Optional[Path] = typer.Option(None, help="JSON naming the train/val/test groups (default: the checkpoint's)."),
    way: int = typer.Option(5, min=2, help="Classes per episode."),
    shot: int = typer.Option(1, min=1, help="Support images per class."),
    query: int = typer.Option(15, min=1, help="Query images per class."),
    episodes: int = typer.Option(1000, min=1, help="Number of episodes; fixed by --seed so models compare on the same tasks."),
    seed: int = typer.Option(0, help="Episode seed."),
    head: str = typer.Option("default", click_type=click.Choice(("default", *head_names())), help="default: the checkpoint's."),
    center: Optional[bool] = typer.Option(None, "--center/--no-center",
                                          help="Checkpoint: CL2N features (centred on the training classes' mean, "
                                               "L2-normalised; default: as the checkpoint records)."),
    flip_shots: Optional[bool] = typer.Option(None, help="Average each support image with its mirror (default: the head's setting)."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Checkpoint: evaluate at this square input size (globally pooled backbones)."),
    open_set: bool = typer.Option(False, "--open-set", help="With --bundle: 5 enrolled + 5 unknown classes per episode; "
                                  "closed accuracy, AUROC, and at --unknown auto: known right / rejected, unknown rejected, balanced."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Few-shot accuracy ± 95% CI on classes never trained on, from a checkpoint (torch) or a bundle (deployed path)."""
    from edgemeta.evaluate import evaluate as run_evaluation
    if checkpoint is not None:
        require_training_extra()
    done = run_evaluation(checkpoint=checkpoint, bundle=bundle, variant=variant, data=[str(p) for p in data or []],
                          split=split, split_mode=split_mode, split_file=str(split_file) if split_file else None,
                          way=way, shot=shot, query=query, episodes=episodes, seed=seed, head=head,
                          center=center, flip_shots=flip_shots, image_size=image_size, open_set=open_set)
    if as_json:
        print_json(done.to_dict())
    elif open_set:
        print(done.result)
        print(f"head={done.head['kind']} split={done.split} ({done.classes} classes), {done.path}")
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
        print_json({**meta, "pretrained": meta.get("pretrained", {}), "center": ckpt.center, "parameters": params}, indent=2)
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
        ("deployed with", "CL2N features (export --center)" if ckpt.center else "plain features"),
        ("edgemeta", meta.get("edgemeta_version", "?")),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
