"""`edgemeta watch`: classify a camera, a video or a stream frame by frame, or enroll a class from it."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer

from edgemeta.cli.common import command, console, err_console, parse_unknown, writable_target
from edgemeta.cli.options import BackendOption, HeadOption, TopKOption, VariantOption

SOURCE_HELP = ("/dev/video0 | v4l2:///dev/video0 | csi://0 (Jetson CSI camera) | clip.mp4 | file://… | rtsp://… | "
               "a folder of images | a GStreamer pipeline ending in appsink")


@command()
def watch(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    store: Path = typer.Option(..., help="Enrollment store folder."),
    source: str = typer.Option(..., help=SOURCE_HELP),
    jsonl: Optional[Path] = typer.Option(None, help="Write one JSON line per classified frame here (default: stdout)."),
    every: int = typer.Option(1, min=1, help="Classify every Nth frame."),
    smooth: int = typer.Option(1, min=1, help="Show the most frequent label of the last K frames (1: no smoothing)."),
    top_k: TopKOption = 1,
    unknown: Optional[str] = typer.Option(None, help="'auto' or a distance: farther frames are 'unknown'."),
    max_frames: Optional[int] = typer.Option(None, min=1, help="Stop after classifying this many frames."),
    duration: Optional[float] = typer.Option(None, click_type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds."),
    capture_size: Optional[str] = typer.Option(None, help="Ask a camera (V4L2, CSI) for WIDTHxHEIGHT frames, e.g. 640x480."),
    realtime: Optional[bool] = typer.Option(None, help="Drop frames when the model is slower than the source (default: for cameras and streams)."),
    enroll: Optional[str] = typer.Option(None, help="Enroll a class of this name from the source instead of classifying."),
    shots: int = typer.Option(5, min=1, help="--enroll: frames to capture."),
    spacing: int = typer.Option(5, min=1, help="--enroll: take every Sth frame (near-duplicates are skipped)."),
    add: bool = typer.Option(False, "--add", help="--enroll: add shots to a class that is already enrolled."),
    then_watch: bool = typer.Option(False, help="--enroll: go on classifying after enrolling."),
    head: HeadOption = None,
    backend: BackendOption = "auto",
    variant: VariantOption = "fp32",
):
    """Classify a live source frame by frame (one JSON line per frame), or enroll a class from it.

    Examples: edgemeta watch bundle --store enrolled --source /dev/video0 --smooth 5 ·
    edgemeta watch bundle --store enrolled --source csi://0 --enroll mug --shots 5 --then-watch
    """
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.errors import ConfigError
    from edgemeta.runtime.sources import VideoSource
    from edgemeta.runtime.watch import enroll_from_source
    from edgemeta.runtime.watch import watch as run_watch
    reject = parse_unknown(unknown)
    writable_target(jsonl, "--jsonl", (bundle, store, Path(source) if Path(source).exists() else None), kind="watch-jsonl")
    size = None
    if capture_size is not None:
        try:
            width, height = (int(v) for v in capture_size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--capture-size takes WIDTHxHEIGHT, e.g. 640x480, not {capture_size!r}") from None
        if not (0 < width <= 8192 and 0 < height <= 8192):
            raise ConfigError(f"--capture-size {capture_size} is out of range")
        size = (width, height)
    clf = FewShotClassifier.load(bundle, store=store, head=head, backend=backend, variant=variant)
    with VideoSource(source, clf.bundle.spec, realtime=realtime, keep_images=enroll is not None,
                     capture_size=size) as frames:
        if enroll is not None:
            count = enroll_from_source(clf, enroll, frames, shots, spacing, mode="add" if add else "new")
            console.print(f"enrolled {enroll!r} from {source}: {count} shot(s); {len(clf.classes)} class(es) in {store}",
                          markup=False)
            if not then_watch:
                return
        out = open(jsonl, "w") if jsonl else sys.stdout
        status = _Status(enabled=err_console.is_terminal)
        try:
            def emit(result: dict) -> None:
                try:
                    out.write(json.dumps(result) + "\n")
                    out.flush()
                except OSError as exc:
                    if jsonl and exc.filename is None:  # a full disk: name the file
                        raise OSError(exc.errno, exc.strerror or str(exc), str(jsonl)) from None
                    raise
                status.update(result)
            summary = run_watch(clf, frames, every=every, smooth=smooth, top_k=top_k, reject=reject,
                                max_frames=max_frames, duration=duration, on_result=emit)
        finally:
            status.close()
            if jsonl:
                with contextlib.suppress(OSError):
                    out.close()
                with contextlib.suppress(OSError):
                    if jsonl.stat().st_size == 0:  # nothing was written (a fault before the first frame)
                        jsonl.unlink()
    message = (f"{summary.classified} frame(s) classified of {summary.read} read, {summary.dropped} dropped, "
               f"{summary.fps:.1f} frames/s")
    err_console.print(message + ("; " + "; ".join(summary.errors) if summary.errors else ""), markup=False)


class _Status:
    """A live status line on a terminal: frames/s and the per-stage latency of the last frame."""

    def __init__(self, enabled: bool):
        self.enabled, self.count, self.t0, self.live = enabled, 0, time.perf_counter(), None
        if enabled:
            self.live = err_console.status("watching")
            self.live.__enter__()

    def update(self, result: dict) -> None:
        self.count += 1
        if self.live is not None:
            fps = self.count / max(time.perf_counter() - self.t0, 1e-9)
            ms = result["ms"]
            self.live.update(f"{fps:5.1f} frames/s · decode {ms['decode']:.1f} ms · embed {ms['embed']:.1f} ms · "
                             f"head {ms['head']:.2f} ms · {result['label']} · dropped {result['dropped']}")

    def close(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
