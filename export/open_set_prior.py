"""The bundle's open-set prior (runtime.open_set), measured at export through the exported graph on
classes the device will not see: the checkpoint's training classes when its training data is here,
else the labelled classes of --calib-data. Only the sample is decoded (at most PRIOR_CLASSES classes
× PRIOR_IMAGES images, seeded)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from edgemeta.runtime.errors import DataError
from edgemeta.runtime.heads import HeadConfig
from edgemeta.runtime.open_set import KNOWN_WAY, MIN_QUERIES, STRANGER_WAY, OpenSetPrior, fit_prior
from edgemeta.runtime.preprocess import InputSpec

PRIOR_CLASSES, PRIOR_IMAGES, PRIOR_EPISODES = 64, 40, 200


def prior_sample(sources: list[str], spec: InputSpec, train_config: dict | None, seed: int = 0):
    """(pixels uint8 NHWC, labels 0..C-1, a description) of the classes the prior is measured on:
    the training split named by `train_config` (split file or mode), else every class of `sources`."""
    from edgemeta.data.loading import index_images
    from edgemeta.data.splits import split_classes
    index = index_images(sources, (train_config or {}).get("layout", "auto"))
    if train_config is not None:
        classes = split_classes(index.groups, "train", train_config.get("split_mode", "auto"),
                                train_config.get("split_seed", 0), train_config.get("split_file", ""))
        what = "training classes"
    else:
        classes, what = list(range(len(index.classes))), "classes"
    counts = np.bincount(index.labels, minlength=len(index.classes))
    classes = [c for c in classes if counts[c] >= 1 + MIN_QUERIES]
    if len(classes) < KNOWN_WAY + STRANGER_WAY:
        raise DataError(f"{len(classes)} usable classes (≥ {1 + MIN_QUERIES} images each); the open-set prior needs "
                        f"{KNOWN_WAY + STRANGER_WAY}")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(classes, min(PRIOR_CLASSES, len(classes)), replace=False).tolist())
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(index.labels == c))[:PRIOR_IMAGES] for c in picked]))
    data = index.decode(rows, spec)
    labels = np.searchsorted(picked, data.labels)
    names = sorted({Path(s).name for s in sources})
    return data.pixels, labels, f"{len(picked)} {what} of {', '.join(names)}, ≤ {PRIOR_IMAGES} images each"


def measure_prior(onnx_path: Path, manifest: dict, pixels: np.ndarray, labels: np.ndarray, source: str,
                  report: Callable[[str], None], episodes: int = PRIOR_EPISODES) -> OpenSetPrior:
    """Embed the sample with the bundle's graph as the device does (support images flipped when the
    head asks) and fit the prior."""
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
    spec = InputSpec.from_dict(manifest["input"])
    head = HeadConfig.from_dict(manifest["head"])
    report(f"open-set prior: {source}, {episodes} episodes per shot count")
    with OnnxRuntimeBackend(onnx_path, spec, manifest["output"]["dim"], "cpu") as backend:
        z = backend.embed_pixels(pixels)
        support = (z + backend.embed_pixels(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2 if head.flip_shots else z
    prior = fit_prior(z, labels, source, support, episodes)
    metric = head.rejection_metric(manifest["output"]["l2_normalized"])
    rows = prior.metrics[metric].rows
    report("open-set prior (" + metric + "): " + ", ".join(
        f"{r.shots}-shot limit {r.threshold:.3g} (AUROC {100 * r.auroc:.1f})" for r in rows))
    return prior
