"""Device commands: enroll, predict, forget, classes, build-engine — their options. What the first
four do is edgemeta.cli.device_actions (no typer), which the fast path of edgemeta.cli.fast runs
from the same options read from device_commands.json, generated from these declarations."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgemeta.cli import device_actions as run
from edgemeta.cli.common import command, console
from edgemeta.cli.options import BackendOption, HeadOption, PrecisionOption, TopKOption, VariantOption


@command()
def enroll(
    bundle: Path = typer.Argument(..., help="Bundle folder from `edgemeta export`."),
    images: Optional[list[Path]] = typer.Argument(None, help="Support images of the class named by --label."),
    store: Path = typer.Option(..., help="Enrollment store folder (created if missing)."),
    label: Optional[str] = typer.Option(None, help="Class name for IMAGES."),
    from_folder: Optional[Path] = typer.Option(None, help="Enroll every subfolder of this folder as a class."),
    add: bool = typer.Option(False, "--add", help="Add shots to a class that is already enrolled."),
    replace: bool = typer.Option(False, "--replace", help="Replace the shots of a class that is already enrolled."),
    head: HeadOption = None,
    backend: BackendOption = "auto",
    variant: VariantOption = "fp32",
    reembed: bool = typer.Option(False, help="The store was made with another bundle: re-embed its kept images with this one."),
):
    """Enroll a class from a few images (or every class of a folder). The store is saved atomically.

    Examples: edgemeta enroll bundle --store enrolled --label mug mug1.jpg mug2.jpg ·
    edgemeta enroll bundle --store enrolled --from-folder photos/
    """
    run.enroll(**locals())


@command()
def predict(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    images: list[Path] = typer.Argument(..., help="Images to classify."),
    store: Optional[Path] = typer.Option(None, help="Enrollment store folder (not for a frozen classifier from `edgemeta freeze`)."),
    top_k: TopKOption = 1,
    unknown: Optional[str] = typer.Option(None, help="'auto' (calibrated on the support set) or a distance: farther images are 'unknown'."),
    head: HeadOption = None,
    backend: BackendOption = "auto",
    variant: VariantOption = "fp32",
    reembed: bool = typer.Option(False, help="The store was made with another bundle: re-embed its kept images with this one."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image, as a list."),
):
    """Classify images against the enrolled classes. Example: edgemeta predict bundle --store enrolled photo.jpg --top-k 3"""
    run.predict(**locals())


@command()
def forget(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    labels: list[str] = typer.Argument(..., help="Class names to remove."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
):
    """Remove enrolled classes (and their kept images) from the store."""
    run.forget(**locals())


@command()
def classes(
    store: Path = typer.Option(..., help="Enrollment store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List the enrolled classes and their shot counts."""
    run.classes(**locals())


@command()
def review(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
    label: Optional[str] = typer.Option(None, help="Review one class (what its enrollment changed) instead of the store."),
    as_json: bool = typer.Option(False, "--json", help='Print {"pairs", "shots", "classes"} as JSON.'),
):
    """What will be confused, which shots look wrong or repeated, and where more shots would help.

    Example: edgemeta review bundle --store enrolled
    """
    run.review(**locals())


@command()
def correct(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    images: list[Path] = typer.Argument(..., help="The images that were answered wrongly."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
    is_label: Optional[str] = typer.Option(None, "--is", help="They are this class: add them as its shots (a new class if needed)."),
    not_label: Optional[str] = typer.Option(None, "--not", help="They are not this class: keep them as negative examples."),
    none: bool = typer.Option(False, "--none", help="They are none of the enrolled classes: keep them as negative examples."),
):
    """Correct a prediction: --is Y, --not X, or --none. Under --unknown auto an image nearer to a
    negative example than to any class answers "unknown".

    Example: edgemeta correct bundle --store enrolled cat.jpg --not dog
    """
    run.correct(**locals())


@command()
def negatives(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
    remove: Optional[list[str]] = typer.Option(None, help="Remove the negative example with this id (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List the negative examples (corrections "not X" / "none"), or remove some with --remove ID."""
    run.negatives(**locals())


@command()
def limit(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    label: Optional[str] = typer.Argument(None, help="The class (default: list every class's limit)."),
    value: Optional[str] = typer.Argument(None, help="Its own limit: a distance, or 'auto' for the rule's."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Each class's "unknown" distance under --unknown auto, or set one class's own.

    Example: edgemeta limit bundle --store enrolled mug 0.35 · edgemeta limit bundle --store enrolled mug auto
    """
    run.limit(**locals())


@command("build-engine")
def build_engine(
    bundle: Path = typer.Argument(..., help="Bundle folder from `edgemeta export`: the engine is added to it."),
    precision: PrecisionOption = "fp32",
    batch: str = typer.Option("1:8:64", help="Batch profile MIN:OPT:MAX (MAX ≥ 64 covers every batch edgemeta sends)."),
    workspace_mb: int = typer.Option(1024, help="Builder workspace limit in MiB."),
    dla: Optional[int] = typer.Option(None, help="DLA core (Jetson Orin), GPU fallback on."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file, loaded and saved."),
):
    """Build a TensorRT engine ON THIS DEVICE into a bundle (TensorRT 10, JetPack ≥ 6.1).

    Example: edgemeta build-engine bundle --precision fp16 --batch 1:8:64
    """
    from edgemeta.cli.common import RichProgress
    from edgemeta.export import EngineOptions, add_engine
    options = EngineOptions(precision, batch, workspace_mb, dla, str(timing_cache) if timing_cache else None)
    record = add_engine(bundle, options, progress=RichProgress())
    console.print(f"engine {record['file']} added to {bundle}")
