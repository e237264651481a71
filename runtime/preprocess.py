"""Image preprocessing shared by training and the device: decode, colour mode, resize, batch.

This is the ONE place where an image becomes model input. Training data loading (edgemeta.data)
and the on-device runtime both call these functions, so the device sees exactly what training saw.
Scaling to [0, 1] and mean/std normalisation are NOT done here: they are part of the model
(edgemeta.backbones.InputNormalize in torch, baked into the exported ONNX graph), so the device
feeds decoded pixels and nothing else.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ConfigError, ImageDecodeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
COLOUR_MODES = {"L": 1, "RGB": 3}
# LANCZOS keeps thin Omniglot strokes visible at 28 px; it is deterministic across platforms.
RESAMPLE = Image.Resampling.LANCZOS

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: image size, colour mode and the normalisation baked into it.

    mean/std are per channel on the [0, 1] scale (pixels / 255).
    """

    height: int
    width: int
    colour: str = "L"
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))

    def __post_init__(self) -> None:
        if self.colour not in COLOUR_MODES:
            raise ConfigError(f"colour must be one of {sorted(COLOUR_MODES)}, not {self.colour!r}")
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"image size must be positive, got {self.height}x{self.width}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1 and self.channels > 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise ConfigError(f"{name} needs {self.channels} values for colour {self.colour}, got {len(values)}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ConfigError("std must be positive")

    @property
    def channels(self) -> int:
        return COLOUR_MODES[self.colour]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std), channels=self.channels, layout="NCHW", dtype="float32", pixel_range=[0, 255])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(height=int(d["height"]), width=int(d["width"]), colour=d["colour"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]))


def open_image(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or PIL image; raise ImageDecodeError naming the file if it will not decode."""
    if isinstance(source, Image.Image):
        return source
    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except FileNotFoundError:
        raise ImageDecodeError(f"image not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image {name}: {exc}. Use a PNG or JPEG file.") from None
    return image


def to_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert colour mode and resize to the spec; returns uint8 [H, W, C].

    Greyscale images inside an RGB set are replicated to three channels; RGB images in a greyscale
    set are converted with PIL's ITU-R 601-2 luma transform.
    """
    if image.mode in ("RGBA", "LA", "P"):
        # Composite transparency onto white so transparent backgrounds do not become black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert(spec.colour)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), RESAMPLE)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def load_image(source: ImageSource, spec: InputSpec) -> np.ndarray:
    """Decode one image and preprocess it: uint8 [H, W, C] as the model's input spec asks."""
    return to_pixels(open_image(source), spec)


def load_images(sources: list[ImageSource], spec: InputSpec) -> np.ndarray:
    """Decode and preprocess several images: uint8 [N, H, W, C]."""
    if not sources:
        return np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)
    return np.stack([load_image(s, spec) for s in sources])


def pixels_to_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (or [H, W, C]) → float32 NCHW in [0, 255], the model's input tensor."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4:
        raise ImageDecodeError(f"expected images shaped [N, H, W, C], got {pixels.shape}")
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
