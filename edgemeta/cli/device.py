"""Device commands: enroll, predict, forget, classes. They import only edgemeta.runtime (no torch)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgemeta.cli.common import command, console, escape, parse_unknown, print_json
from edgemeta.cli.options import BackendOption, HeadOption, PrecisionOption, TopKOption, VariantOption


def _open(bundle: Path, store: Path, head: Optional[str], backend: str, variant: str, reembed: bool = False):
    from edgemeta.runtime import FewShotClassifier
    return FewShotClassifier.load(bundle, store=store, head=head, backend=backend, variant=variant, reembed=reembed)


def folder_classes(folder: Path) -> dict[str, list[Path]]:
    """<folder>/<label>/<images>: every subfolder is a class; an empty one is an error, not a skip."""
    from edgemeta.runtime.errors import DataError, StoreError
    from edgemeta.runtime.preprocess import IMAGE_EXTENSIONS
    if not folder.is_dir():
        raise DataError(f"--from-folder {folder} is not a folder")
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise StoreError(f"class folder {sub} has no images (png/jpg); add some or remove the folder")
        classes[sub.name] = images
    if not classes:
        raise DataError(f"{folder} has no class subfolders; expected {folder}/<label>/<image>")
    return classes


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
    from edgemeta.runtime.errors import ConfigError
    if add and replace:
        raise ConfigError("--add and --replace exclude each other")
    mode = "add" if add else "replace" if replace else "new"
    if from_folder is not None:
        if images or label:
            raise ConfigError("use either --from-folder or --label with IMAGES, not both")
        todo = folder_classes(from_folder)
    else:
        if not label:
            raise ConfigError("name the class with --label NAME (or use --from-folder DIR)")
        todo = {label: list(images or [])}
    clf = _open(bundle, store, head, backend, variant, reembed)
    for name, shots in clf.enroll_many(todo, mode=mode).items():  # all classes checked before any is saved
        console.print(f"enrolled {name!r}: {shots} shot(s)", markup=False)
    console.print(f"{len(clf.classes)} class(es) in {store}")


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
    from edgemeta.runtime.errors import ConfigError, StoreError
    reject = parse_unknown(unknown)
    from edgemeta.runtime.frozen import FrozenClassifier, is_frozen
    if is_frozen(bundle):
        if store is not None or head is not None:
            raise ConfigError(f"{bundle} is a frozen classifier: its classes and head are inside it (no --store/--head)")
        result = FrozenClassifier.load(bundle).predict(list(images), top_k=top_k, reject=reject)
    else:
        if store is None:
            raise ConfigError("give the enrollment store with --store DIR (or predict with a frozen classifier)")
        if not Path(store).exists():
            raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
        clf = _open(bundle, store, head, backend, variant, reembed)
        result = clf.predict(list(images), top_k=top_k, reject=reject)
    rows = result.to_list()
    if as_json:
        print_json([{"image": str(p), **r} for p, r in zip(images, rows)], indent=2)
        return
    from rich.table import Table
    table = Table("image", "label", f"top {top_k}" if top_k > 1 else "probability", "distance")
    for p, r in zip(images, rows):
        tops = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in r["top_k"])
        table.add_row(escape(str(p)), escape(r["label"]), escape(tops), f"{r['distance']:.3f}")
    console.print(table)


@command()
def forget(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    labels: list[str] = typer.Argument(..., help="Class names to remove."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
):
    """Remove enrolled classes (and their kept images) from the store."""
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; nothing to forget")
    clf = _open(bundle, store, None, "onnxruntime", "fp32")
    missing = [label for label in labels if label not in clf.classes]
    if missing:  # check every label before removing any
        raise StoreError(f"{missing[0]!r} is not enrolled (enrolled: {', '.join(clf.classes) or 'none'}); nothing was removed")
    for label in labels:
        clf.forget(label)
        console.print(f"forgot {label!r}", markup=False)
    console.print(f"{len(clf.classes)} class(es) left")


@command()
def classes(
    store: Path = typer.Option(..., help="Enrollment store folder."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List the enrolled classes and their shot counts."""
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    state = EnrollmentStore(store).read()
    if state is None:
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    shots = {c.label: c.shots for c in state.classes}
    if as_json:
        print_json({"classes": shots, "head": state.head.to_dict(), "model_sha256": state.model_sha256})
        return
    from rich.table import Table
    table = Table("class", "shots", title=f"{store} — head {state.head.kind}")
    for k, v in shots.items():
        table.add_row(escape(k), str(v))
    console.print(table)


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
