"""edgemeta.runtime: the on-device part. numpy + ONNX Runtime or TensorRT + Pillow; never torch.

    from edgemeta.runtime import FewShotClassifier
    clf = FewShotClassifier.load("bundle/", store="enrolled/")
"""
from __future__ import annotations

from .bundle import Bundle, load_bundle
from .classifier import UNKNOWN, FewShotClassifier, Prediction
from .errors import BundleError, CheckpointError, ConfigError, DataError, DependencyError, EdgemetaError, ImageDecodeError, StoreError
from .preprocess import InputSpec, load_image, load_images, pixels_to_batch

__all__ = ["UNKNOWN", "Bundle", "BundleError", "CheckpointError", "ConfigError", "DataError", "DependencyError", "EdgemetaError",
           "FewShotClassifier", "ImageDecodeError", "InputSpec", "Prediction", "StoreError", "load_bundle",
           "load_image", "load_images", "pixels_to_batch"]
