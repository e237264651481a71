"""`edgemeta export` and bundle inspection."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import typer
from rich.table import Table

from edgemeta.cli.common import command, console, print_json
from edgemeta.runtime.bundle import VARIANTS
from edgemeta.runtime.preprocess import COLOUR_MODES


@command()
def export(
    source: Path = typer.Argument(..., help="A checkpoint (.safetensors), or with --onnx your own ONNX embedding model."),
    out: Optional[Path] = typer.Option(None, help="Bundle folder to create (default: SOURCE name + '.bundle')."),
    onnx: bool = typer.Option(False, "--onnx", help="SOURCE is your own ONNX embedding model: wrap it into a bundle."),
    input_size: Optional[int] = typer.Option(None, help="--onnx: square input size in pixels."),
    colour: str = typer.Option("L", click_type=click.Choice(tuple(COLOUR_MODES)), help="--onnx: the model's input."),
    mean: Optional[str] = typer.Option(None, help="--onnx: per-channel mean on the [0,1] scale, e.g. 0.485,0.456,0.406 (must already be in the graph's expectations)."),
    std: Optional[str] = typer.Option(None, help="--onnx: per-channel std on the [0,1] scale."),
    l2_normalize: bool = typer.Option(False, help="L2-normalise embeddings inside the graph (the head then uses cosine)."),
    center: Optional[bool] = typer.Option(None, "--center/--no-center",
                                          help="CL2N: subtract the training classes' mean embedding, then L2-normalise, "
                                               "inside the graph (default: as the checkpoint records)."),
    flip_shots: bool = typer.Option(False, help="The bundle's head averages each support image with its horizontal mirror."),
    int8: bool = typer.Option(False, "--int8", help="Add an INT8 (QDQ, per-channel) variant calibrated on real images."),
    fp16: bool = typer.Option(False, "--fp16", help="Add an FP16 variant (CUDA provider, TensorRT fp16 engines)."),
    calib_data: Optional[list[Path]] = typer.Option(None, help="Real images for parity, calibration and the INT8 accuracy check (folder or .zip)."),
    calib_images: int = typer.Option(256, help="Number of calibration images."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle (never a folder that is not one)."),
    image_size: Optional[int] = typer.Option(None, help="Checkpoint: export for this square input size (globally pooled backbones: trained at 160, deployed at 224)."),
):
    """Export the backbone into a bundle (manifest.json + parity-checked ONNX [+ INT8/FP16]). TensorRT
    engines are built on the device into the bundle with `edgemeta build-engine`.

    Examples:

      edgemeta export ckpt.safetensors --out bundle --int8 --fp16 --calib-data photos/

      edgemeta export model.onnx --onnx --input-size 64 --colour RGB --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --out bundle
    """
    from edgemeta import export as ex
    from edgemeta.cli.common import RichProgress
    from edgemeta.runtime.errors import ConfigError
    options = ex.ExportOptions(l2_normalize=l2_normalize, center=center, flip_shots=flip_shots, int8=int8, fp16=fp16,
                               calib_data=tuple(str(p) for p in calib_data or ()), calib_images=calib_images,
                               overwrite=overwrite, image_size=image_size)
    target = out or source.with_suffix(".bundle")
    if onnx:
        from edgemeta.runtime.extras import require
        require("onnx", purpose="--onnx")
        from edgemeta.runtime.preprocess import InputSpec
        if input_size is None:
            raise ConfigError("--onnx needs --input-size (and --mean/--std if the graph does not normalise itself)")
        if int8 or fp16 or center:
            raise ConfigError("--int8/--fp16/--center are made from checkpoints; --onnx wraps your model as it is")

        def parse(text, default):
            if not text:
                return default
            try:
                return tuple(float(v) for v in text.split(","))
            except ValueError:
                raise ConfigError(f"--mean/--std take comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None
        spec = InputSpec(input_size, input_size, colour, parse(mean, (0.0,)), parse(std, (1.0,)))
        manifest = ex.wrap_onnx(source, target, spec, options, progress=RichProgress())
    else:
        from edgemeta.cli.common import require_training_extra
        require_training_extra()
        with console.status("exporting"):
            manifest = ex.export_checkpoint(source, target, options, progress=RichProgress())
    console.print(f"bundle written: {target} ({', '.join(manifest['files'])})")


def inspect_bundle(path: Path, as_json: bool) -> None:
    from edgemeta.runtime.bundle import load_bundle
    bundle = load_bundle(path)
    bundle.verify_every_file()  # each file row below says ✓
    m = bundle.manifest
    if as_json:
        print_json(m, indent=2)
        return
    table = Table(title=f"bundle {path}", show_header=False)
    spec = m["input"]
    table.add_row("schema", f"{m['schema']} {m['schema_version']} (edgemeta {m['edgemeta_version']})")
    table.add_row("model", f"{m['model']['backbone']} from {m['model'].get('source')}")
    table.add_row("input", f"{spec['name']}: float32 NCHW [N, {spec['channels']}, {spec['height']}, {spec['width']}] "
                           f"{spec['colour']} pixels 0–255")
    table.add_row("output", f"{m['output']['name']}: [N, {m['output']['dim']}]"
                            + (" L2-normalised" if m["output"]["l2_normalized"] else ""))
    table.add_row("head", json.dumps(m["head"]))
    from edgemeta.runtime.open_set import describe_rule
    auto = describe_rule(bundle.open_set, bundle.head.rejection_metric(bundle.l2_normalized))
    if auto["rule"] == "prior":
        table.add_row("--unknown auto", f"open-set prior measured on {auto['measured_on']} ({auto['metric']}): limit "
                      + ", ".join(f"{k}-shot {v:.3g}" for k, v in auto["thresholds"].items())
                      + "; nearer a negative example than any class: unknown")
    else:
        table.add_row("--unknown auto", auto["detail"])
    for name, entry in m["files"].items():
        table.add_row(f"file {name}", f"{entry['bytes']:,} bytes sha256 {entry['sha256'][:16]}… ✓")
    for variant, v in m["variants"].items():
        extra = ""
        if v.get("parity"):
            extra = f"parity rel {v['parity']['max_rel_error']:.1e}"
        if "accuracy_delta_points" in v:
            extra = f"accuracy {v['accuracy_delta_points']:+.2f} pts, ×{v['speedup_batch1']:.2f} at batch 1"
        table.add_row(f"variant {variant}", f"{v['file']} {extra}")
    for e in m["engines"]:
        table.add_row("engine", f"{e['file']}: TensorRT {e['tensorrt_version']} {e['gpu_name']} sm{e['compute_capability']} "
                                f"{e['precision']} batch {e['profile']}")
    from edgemeta.runtime.backends import runnable_here
    for name, can in runnable_here(bundle).items():
        table.add_row(f"runs here: {name}", can)
    console.print(table)


@command()
def freeze(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    store: Path = typer.Option(..., help="Enrollment store whose classes and fitted head go into the graph."),
    out: Path = typer.Option(..., help="Folder to write: classifier.onnx, labels.txt, manifest, Triton and DeepStream configs."),
    variant: str = typer.Option("fp32", click_type=click.Choice(VARIANTS), help="The ONNX variant the frozen graph is built from."),
    overwrite: bool = typer.Option(False, help="Replace an existing frozen classifier."),
):
    """Freeze backbone + fitted head into one ONNX graph (probabilities and nearest-class distance) for
    Triton, DeepStream's nvinfer or TensorRT. Re-freeze whenever the classes change."""
    from edgemeta.runtime.extras import require
    require("onnx", purpose="edgemeta freeze")
    from edgemeta.cli.common import RichProgress
    from edgemeta.export.freeze import freeze as run_freeze
    manifest = run_freeze(bundle, store, out, variant=variant, overwrite=overwrite, progress=RichProgress())
    folders = "triton/, deepstream/" if manifest["frozen"]["deepstream"]["written"] else "triton/"
    console.print(f"frozen classifier written: {out} ({len(manifest['frozen']['classes'])} classes; "
                  f"{folders}, labels.txt)", markup=False)
