"""`edgemeta bench`: measure this device with a bundle; table, JSON and plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edgemeta.cli.common import command, console
from edgemeta.cli.options import BackendOption, VariantOption
from edgemeta.runtime.heads import head_names


def _ints(text: str) -> list[int]:
    from edgemeta.runtime.errors import ConfigError
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"expected positive integers, got {text!r}")
    return values


def gather_images(source: Optional[Path], spec, count: int = 64) -> list[bytes]:
    """Encoded image files to decode in the benchmark: from a folder/zip, else synthetic PNGs."""
    if source is not None:
        from edgemeta.data.sources import iter_image_entries
        images = [read() for _, read in iter_image_entries(source)][:count]
        if images:
            return images
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        arr = rng.integers(0, 256, (spec.height * 2, spec.width * 2, spec.channels), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if spec.channels == 1 else arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@command()
def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    backend: BackendOption = "auto",
    variant: VariantOption = "fp32",
    way: str = typer.Option("5", help="Ways, comma-separated."),
    shot: str = typer.Option("1,5", help="Shots, comma-separated."),
    steps: str = typer.Option("1,10,50", help="Logistic head SGD step counts."),
    head: str = typer.Option("all", help=f"all, or heads comma-separated: {', '.join(head_names())}."),
    batch: str = typer.Option("1,8,32", help="Embedding batch sizes."),
    repeat: int = typer.Option(50, min=1, help="Timed repeats per measurement (after warm-up)."),
    images: Optional[Path] = typer.Option(None, help="Folder or .zip of real images to decode (default: synthetic PNGs)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot here."),
):
    """Latency per stage (embed, fit, predict) and per adaptation step, p50/p90/p99, on this device."""
    from edgemeta.cli.common import writable_target
    from edgemeta.runtime.bench import render_plot, run_bench
    from edgemeta.runtime.bundle import load_bundle
    from edgemeta.runtime.errors import ConfigError
    if repeat < 1:
        raise ConfigError(f"--repeat must be ≥ 1, got {repeat}")
    writable_target(json_out, "--json", (bundle, images), kind="bench-json")  # checked before the run, not after it
    writable_target(plot, "--plot", (bundle, images), kind="bench-png")
    from edgemeta.runtime.heads import head_names
    heads = list(head_names()) if head == "all" else [h.strip() for h in head.split(",")]
    if set(heads) - set(head_names()):
        raise ConfigError(f"unknown head in {head!r}; choose from {', '.join(head_names())}")
    b = load_bundle(bundle)
    from edgemeta.cli.common import RichProgress
    if "frozen" in b.manifest:  # a frozen classifier: the graph and predict per batch, nothing to fit
        from edgemeta.runtime.bench import run_frozen_bench
        result = run_frozen_bench(b, gather_images(images, b.spec), _ints(batch), repeat, progress=RichProgress())
    else:
        result = run_bench(b, gather_images(images, b.spec), backend, variant, _ints(way), _ints(shot), _ints(steps),
                           heads, _ints(batch), repeat, progress=RichProgress())
    print_table(result)
    if json_out:
        from edgemeta.runtime.files import atomic_write
        atomic_write(json_out, json.dumps(result, indent=2).encode())  # whole or not at all: never a 0-byte file
        console.print(f"JSON: {json_out}")
    if plot:
        render_plot(result, plot)
        console.print(f"plot: {plot}")


def print_table(result: dict) -> None:
    env = result["environment"]
    t = Table("stage", "p50 ms", "p90 ms", "p99 ms", "note",
              title=f"{result['bundle']['backbone']} {result['bundle']['variant']} on {env.get('backend')} — "
                    f"{env.get('cpu')} ({env.get('cores')} cores)")
    row = lambda name, r, note="": t.add_row(name, f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", note)  # noqa: E731
    for r in result["embed"]:
        row(f"embed batch {r['batch']}", r, f"{r['images_per_s']:.0f} images/s")
    for r in result["head_fit"]:
        row(f"{r['head']} fit {r['way']}-way {r['shot']}-shot", r)
    for r in result["logistic_steps"]:
        row(f"logistic {r['steps']} steps {r['way']}w{r['shot']}s", r["total"], f"per step p50 {r['per_step']['p50_ms'] * 1e3:.1f} µs")
    for r in result["enroll"]:
        row(f"enroll a class, {r['shot']}-shot", r, f"{r['per_shot_p50_ms']:.2f} ms per shot (decode+embed+fit)")
    for r in result.get("graph", []):
        row(f"frozen graph batch {r['batch']}", r, f"{r['images_per_s']:.0f} images/s (backbone + head)")
    for r in result["predict"]:
        row(f"predict batch {r['batch']}", r, "decode+embed+head")
    t.caption = f"peak RSS {result['peak_rss_mb']:.0f} MB"
    console.print(t)
