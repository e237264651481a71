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
    """backend: auto (a TensorRT engine built into the folder with `edgemeta build-engine` if one
    matches this device, else ONNX Runtime) | onnxruntime | tensorrt."""

    def __init__(self, bundle: Bundle, providers: str | list[str] = "auto", backend: str = "auto",
                 device: dict | None = None, threads: int | None = None):
        from .backends.onnxruntime import OnnxRuntimeBackend, tensorrt_ep_options
        if "frozen" not in bundle.manifest:
            raise BundleError(f"{bundle.path} is an embedding bundle, not a frozen classifier; give it a --store")
        self.bundle, self.frozen = bundle, bundle.manifest["frozen"]
        self.labels: list[str] = list(self.frozen["classes"])
        from .backends import open_engine, parse_backend  # the engine: `edgemeta build-engine` on the folder
        backend, named = parse_backend(backend)
        providers = named if named != "auto" else providers
        self.engine = open_engine(bundle, backend, "fp32", device,
                                  named_outputs={"probabilities": len(self.labels), "distance": 1},
                                  subject="TensorRT engine of this frozen classifier runs here", stacklevel=3)
        self.backend = None
        if self.engine is not None:
            return
        # ONNX Runtime through the same Backend as embedding bundles: provider choice, the TensorRT
        # provider's engine and timing caches and batch profile, the fallback with a warning, the
        # graph's I/O checked against the manifest (its first output: probabilities [N, classes])
        self.backend = OnnxRuntimeBackend(bundle.variant_path("fp32"), bundle.spec, len(self.labels), providers,
                                          threads, trt_options=tensorrt_ep_options(bundle, "fp32"))
        outputs = [o.name for o in self.backend.session.get_outputs()]
        if outputs[:2] != ["probabilities", "distance"] or len(self.labels) != self.bundle.manifest["output"]["dim"]:
            raise BundleError(f"{bundle.path}: the frozen graph returns {outputs}; re-freeze it")

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike, backend: str = "auto", device: dict | None = None) -> FrozenClassifier:
        return cls(load_bundle(bundle_dir), backend=backend, device=device)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] → (probabilities [N, C], distance [N]), one graph call per MAX_BATCH images."""
        if self.engine is not None:
            out = self.engine.run_outputs(pixels_to_batch(pixels))
            return out["probabilities"], out["distance"]
        assert self.backend is not None
        probs, dists = [], []
        for i in range(0, len(pixels), MAX_BATCH):
            out = self.backend.run_outputs(pixels_to_batch(pixels[i:i + MAX_BATCH]), ("probabilities", "distance"))
            probs.append(out["probabilities"])
            dists.append(out["distance"])
        return np.concatenate(probs), np.concatenate(dists)

    def predict(self, images: Sequence[ImageSource] | np.ndarray, top_k: int = 1,
                reject: float | str | None = None) -> Prediction:
        if top_k < 1:
            raise ConfigError("top_k must be ≥ 1")
        images = as_source_list(images)
        spec = self.bundle.spec
        pixels = check_pixels(images, spec) if isinstance(images, np.ndarray) else load_images(images, spec)
        probs, distances = self.run(pixels)
        threshold = self.frozen.get("auto_threshold") if reject == "auto" else None if reject is None else float(reject)
        return make_prediction(self.labels, probs, distances, top_k, threshold)
