"""edgemeta.runtime: the on-device part. numpy + ONNX Runtime or TensorRT + Pillow; never torch."""
from __future__ import annotations

from .errors import (BundleError, CheckpointError, ConfigError, DataError, EdgemetaError,
                     ImageDecodeError, StoreError)
from .preprocess import InputSpec, load_image, load_images, pixels_to_batch

__all__ = ["BundleError", "CheckpointError", "ConfigError", "DataError", "EdgemetaError",
           "ImageDecodeError", "InputSpec", "StoreError", "load_image", "load_images", "pixels_to_batch"]
