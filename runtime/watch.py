"""Classify a live source frame by frame, and enroll a class from it. The reader thread of
runtime.sources decodes and resizes; this loop embeds and fits nothing (the head is fitted at
enrollment), so a frame costs one embedding and the head's scoring."""
from __future__ import annotations

import io
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .classifier import FewShotClassifier
from .errors import ConfigError, DataError
from .sources import Frame, VideoSource


class Smoother:
    """The label shown is the most frequent of the last K raw labels (ties: the latest), as
    jetson-inference smooths its classifier, so a label does not flicker between two classes."""

    def __init__(self, window: int):
        if window < 1:
            raise ConfigError(f"--smooth must be ≥ 1, got {window}")
        self.recent: deque[str] = deque(maxlen=window)

    def __call__(self, label: str) -> str:
        self.recent.append(label)
        counts = Counter(self.recent)
        best = max(counts.values())
        return next(lab for lab in reversed(self.recent) if counts[lab] == best)


@dataclass
class WatchSummary:
    classified: int
    read: int
    dropped: int
    seconds: float
    errors: list[str]

    @property
    def fps(self) -> float:
        return self.classified / self.seconds if self.seconds > 0 else 0.0


def watch(clf: FewShotClassifier, source: VideoSource, *, every: int = 1, smooth: int = 1, top_k: int = 1,
          reject: float | str | None = None, max_frames: int | None = None, duration: float | None = None,
          on_result: Callable[[dict], None] = lambda r: None) -> WatchSummary:
    """Classify every `every`-th frame until the source ends, `max_frames` frames were classified
    or `duration` seconds passed; each result goes to on_result as a JSON-ready dict."""
    if every < 1:
        raise ConfigError(f"--every must be ≥ 1, got {every}")
    if not clf.classes:
        raise DataError("no classes are enrolled; enroll some first (`edgemeta enroll`, or `edgemeta watch --enroll`)")
    smoother = Smoother(smooth)
    t0, done = time.perf_counter(), 0
    for frame in source:
        if frame.index % every:
            continue
        behind = source.stats.read - 1 - frame.index  # newer frames already read when this one was taken
        t_embed = time.perf_counter()
        query = clf.embed(frame.pixels[None])
        t_head = time.perf_counter()
        prediction = clf.classify_embeddings(query, top_k=top_k, reject=reject)
        t_end = time.perf_counter()
        raw = prediction.labels[0]
        on_result({"frame": frame.index, "timestamp": round(frame.timestamp, 4), "label": smoother(raw), "raw_label": raw,
                   **{k: v for k, v in prediction.to_list()[0].items() if k != "label"},
                   "ms": {"decode": round(frame.decode_ms, 3), "embed": round((t_head - t_embed) * 1e3, 3),
                          "head": round((t_end - t_head) * 1e3, 3)},
                   "behind": behind, "dropped": source.stats.dropped})
        done += 1
        if (max_frames is not None and done >= max_frames) or (duration is not None and t_end - t0 >= duration):
            break
    return WatchSummary(done, source.stats.read, source.stats.dropped, time.perf_counter() - t0, list(source.stats.errors))


def capture_shots(source: VideoSource, shots: int, spacing: int = 1, min_change: float = 2.0) -> Iterator[Frame]:
    """N frames `spacing` frames apart, skipping near-duplicates (mean absolute difference of the
    model-size pixels to the last kept shot below `min_change` grey levels)."""
    if shots < 1 or spacing < 1:
        raise ConfigError(f"--shots and --spacing must be ≥ 1, got {shots} and {spacing}")
    kept, last = 0, None
    for frame in source:
        if frame.index % spacing:
            continue
        if last is not None and np.abs(frame.pixels.astype(np.int16) - last).mean() < min_change:
            continue
        last = frame.pixels.astype(np.int16)
        kept += 1
        yield frame
        if kept == shots:
            return
    raise DataError(f"the source ended after {kept} distinct frame(s); {shots} were asked for "
                    "(lower --shots or --spacing, or move the object between shots)")


def enroll_from_source(clf: FewShotClassifier, label: str, source: VideoSource, shots: int, spacing: int = 1,
                       mode: str = "new") -> int:
    """Capture the shots, then enroll them in one atomic save; the full-size frames are kept (as
    PNG) in the store like enrolled files, so the class can be re-embedded for another model."""
    from PIL import Image

    from .labels import check_label
    label = check_label(label)  # before the camera runs: a bad label wastes no capture
    if mode == "new" and label in clf.classes:
        from .errors import ClassExistsError
        raise ClassExistsError(f"{label!r} is already enrolled; use --add to add shots")
    images = []
    for frame in capture_shots(source, shots, spacing):
        buf = io.BytesIO()
        Image.fromarray(frame.image if frame.image is not None else frame.pixels.squeeze()).save(buf, format="PNG")
        images.append(buf.getvalue())
    return clf.enroll(label, images, mode=mode)
