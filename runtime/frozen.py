"""A frozen classifier (`edgemeta freeze`): backbone and fitted head in one ONNX graph that returns
class probabilities and the nearest-class distance. Run here with ONNX Runtime, no store needed;
elsewhere with Triton, DeepStream or TensorRT."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .backends.base import MAX_BATCH
from .bundle import MANIFEST, Bundle, load_bundle
from .classifier import Prediction, as_source_list, make_prediction
from .errors import BundleError, ConfigError
from .preprocess import ImageSource, check_pixels, load_images, pixels_to_batch


def is_frozen(bundle_dir: str | os.PathLike) -> bool:
    """Whether a folder holds a frozen classifier rather than an embedding bundle."""
    try:
        return "frozen" in json.loads((Path(bundle_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


class FrozenClassifier:
    """backend: as for embedding bundles (runtime.backends): auto (a TensorRT engine built into the
    folder with `edgemeta build-engine` if one matches this device, else ONNX Runtime) | onnxruntime
    [:PROVIDER,…] | tensorrt. The graph runs through the same `Backend` as an embedding network, with
    two named outputs: probabilities [N, classes] and distance [N]."""

    def __init__(self, bundle: Bundle, providers: str | list[str] = "auto", backend: str = "auto",
                 device: dict | None = None, threads: int | None = None):
        from .backends import open_backend
        if "frozen" not in bundle.manifest:
            raise BundleError(f"{bundle.path} is an embedding bundle, not a frozen classifier; give it a --store")
        self.bundle, self.frozen = bundle, bundle.manifest["frozen"]
        self.labels: list[str] = list(self.frozen["classes"])
        if len(self.labels) != bundle.manifest["output"]["dim"]:
            raise BundleError(f"{bundle.path}: the manifest lists {len(self.labels)} classes for an output of "
                              f"{bundle.manifest['output']['dim']}; re-freeze it")
        self.backend = open_backend(bundle, backend, "fp32", providers, threads, device,
                                    outputs={"probabilities": len(self.labels), "distance": 1,
                                             "probabilities_known": len(self.labels)},
                                    subject="TensorRT engine of this frozen classifier runs here")

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, backend: str = "auto", device: dict | None = None) -> FrozenClassifier:
        return cls(load_bundle(bundle_dir), backend=backend, device=device)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] → (probabilities [N, C], distance [N], the auto rule's gated probabilities
        [N, C]), one graph call per MAX_BATCH images."""
        outs: dict[str, list] = {"probabilities": [], "distance": [], "probabilities_known": []}
        for i in range(0, len(pixels), MAX_BATCH):
            out = self.backend.run_outputs(pixels_to_batch(pixels[i:i + MAX_BATCH]))
            for name, parts in outs.items():
                parts.append(out[name])
        return tuple(np.concatenate(parts) for parts in outs.values())  # type: ignore[return-value]

    def predict(self, images: Sequence[ImageSource] | np.ndarray, top_k: int = 1,
                reject: float | str | None = None) -> Prediction:
        if top_k < 1:
            raise ConfigError("top_k must be ≥ 1")
        images = as_source_list(images)
        spec = self.bundle.spec
        pixels = check_pixels(images, spec) if isinstance(images, np.ndarray) else load_images(images, spec)
        probs, distances, gated = self.run(pixels)
        rejected: np.ndarray | None = None
        if reject == "auto":  # the graph's own gate: the auto rule frozen in (all zero when rejected)
            rejected = gated.max(1) < 0.5 * probs.max(1)
        elif reject is not None:
            rejected = distances > float(reject)
        return make_prediction(self.labels, probs, distances, top_k, rejected)
