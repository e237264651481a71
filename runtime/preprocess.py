"""Image preprocessing shared by training and the device: decode, colour mode, resize, batch.

This is the ONE place where an image becomes model input. Training data loading (edgemeta.data)
and the on-device runtime both call these functions, so the device sees exactly what training saw.
Scaling to [0, 1] and mean/std normalisation are NOT done here: they are part of the model
(edgemeta.backbones.InputNormalize in torch, baked into the exported ONNX graph), so the device
feeds decoded pixels and nothing else.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BusyError, ConfigError, ImageDecodeError, ImageTooLargeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# The formats edgemeta opens, and only these: Pillow's plugins for them read a header at open and
# decode in load(), after the pixel limit and the decode budget. Others decode inside Image.open
# (ICO and ICNS decode an embedded PNG to learn its size) or cost far more per pixel (TIFF's 32-bit
# modes, JPEG 2000): they are refused before any plugin runs.
OPEN_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
# Peak bytes per pixel while an image of each mode is decoded and converted (the decoded image, the
# conversion's copies), in units of 8 (an RGB decode and its resize): what the decode budget counts.
_BYTES_PER_PIXEL = {"1": 2, "L": 4, "P": 5, "LA": 8, "PA": 10, "RGB": 8, "RGBA": 10, "CMYK": 10, "YCbCr": 8,
                    "I;16": 12, "I;16L": 12, "I;16B": 12, "I": 14, "F": 14}


def decode_cost(image: Image.Image) -> int:
    """What decoding this image holds of a DecodeBudget: its pixels, weighted by its mode's peak bytes
    per pixel relative to an RGB decode (a 16-bit or 32-bit greyscale PNG costs more than its pixel
    count says)."""
    return -(-image.width * image.height * _BYTES_PER_PIXEL.get(image.mode, 12) // 8)
COLOUR_MODES = {"L": 1, "RGB": 3}
# LANCZOS keeps thin Omniglot strokes visible at 28 px; it is deterministic across platforms.
RESAMPLE = Image.Resampling.LANCZOS
# An image at least this many times the model's size is first shrunk by an integer factor (box
# filter), then resampled: 1080p → 64×64 in 1.5 ms instead of 15 ms. Images under 3× the model size
# (every training set here: Omniglot 105 → 28, Tiny ImageNet 64, CIFAR 32) resize exactly as
# without it; the accuracy effect on large inputs is measured in docs/benchmarks.md §9.
REDUCING_GAP = 3.0

ImageSource = Union[str, os.PathLike, bytes, Image.Image]

# The largest image (width × height) edgemeta decodes: 40 MP covers every phone camera; a bigger or
# crafted image (a "decompression bomb": kilobytes on disk, gigabytes decoded) is refused before
# its pixels are read. EDGEMETA_MAX_PIXELS overrides it.
DEFAULT_MAX_PIXELS = 40_000_000
# Largest side an input spec (manifest, store, checkpoint) may ask for.
MAX_INPUT_SIDE = 4096


def max_pixels() -> int:
    text = os.environ.get("EDGEMETA_MAX_PIXELS", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"EDGEMETA_MAX_PIXELS must be a whole number of pixels, not {text!r}") from None
    if value < 1:
        raise ConfigError(f"EDGEMETA_MAX_PIXELS must be positive, not {value}")
    return value


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
        for side in (self.height, self.width):
            if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_INPUT_SIDE:
                raise ConfigError(f"image size must be whole numbers from 1 to {MAX_INPUT_SIDE}, "
                                  f"got {self.height!r}x{self.width!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1 and self.channels > 1:
                values = values * self.channels
            if len(values) != self.channels:
                raise ConfigError(f"{name} needs {self.channels} values for colour {self.colour}, got {len(values)}")
            object.__setattr__(self, name, values)
        if not all(np.isfinite(self.mean + self.std)) or min(self.std) <= 0:
            raise ConfigError("mean and std must be finite and std positive")

    @property
    def channels(self) -> int:
        return COLOUR_MODES[self.colour]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean=list(self.mean), std=list(self.std), channels=self.channels, layout="NCHW", dtype="float32", pixel_range=[0, 255])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        try:
            return cls(height=d["height"], width=d["width"], colour=d["colour"],
                       mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"input spec {d!r} is not valid: {exc}") from None


class DecodeBudget:
    """Pixels being decoded at once, shared by every thread that decodes: a decode waits (up to
    `timeout` seconds, then BusyError) until its image fits. An image larger than the whole budget
    decodes alone. What bounds a service's memory per request in flight: a 40 MP PNG costs
    ~8 bytes per pixel while it is decoded and resized."""

    def __init__(self, pixels: int, timeout: float = 30.0):
        if pixels < 1:
            raise ConfigError(f"the decode budget must be ≥ 1 pixel, got {pixels}")
        self.total, self.timeout = pixels, timeout
        self._free = pixels
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        need = min(max(pixels, 1), self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= need, timeout=self.timeout):
                raise BusyError(f"busy: other requests are decoding {self.total - self._free:,} pixels "
                                f"(budget {self.total:,}); try again")
            self._free -= need
        try:
            yield
        finally:
            with self._cond:
                self._free += need
                self._cond.notify_all()


def peek_image(source: ImageSource) -> Image.Image:
    """Open a path, raw bytes or PIL image and read its header only (no pixels decoded); anything
    over max_pixels() is refused here. ImageDecodeError names the file if it is not an image."""
    if isinstance(source, Image.Image):
        return source
    name = _name(source)
    if not isinstance(source, bytes):
        try:
            mode = os.stat(source).st_mode
        except FileNotFoundError:
            raise ImageDecodeError(f"image not found: {name}") from None
        except OSError as exc:
            raise ImageDecodeError(f"cannot read image {name}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(f"{name} is not a regular file (a folder, FIFO or device); give image files")
    limit = max_pixels()
    with _decode_errors(name):
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=OPEN_FORMATS)
        if image.width * image.height > limit:
            raise ImageTooLargeError(f"image {name} is {image.width}×{image.height} = {image.width * image.height:,} "
                                     f"pixels, over the limit of {limit:,} (EDGEMETA_MAX_PIXELS); resize it first")
    return image


def open_image(source: ImageSource, size_hint: tuple[int, int] | None = None) -> Image.Image:
    """peek_image, then decode; raise ImageDecodeError naming the file if it will not decode.

    size_hint (width, height): the size the image will be resized to. A JPEG is then decoded in
    draft mode (scaled by 1/2, 1/4 or 1/8 in the DCT domain) to no less than twice that size, so a
    12 MP photo for a 64×64 model is never decoded in full.
    """
    return _decode(peek_image(source), _name(source), size_hint)


def _name(source: ImageSource) -> str:
    return "<image>" if isinstance(source, Image.Image) else "<bytes>" if isinstance(source, bytes) else os.fspath(source)


def _decode(image: Image.Image, name: str, size_hint: tuple[int, int] | None) -> Image.Image:
    with _decode_errors(name):
        if size_hint is not None and image.format == "JPEG":
            image.draft(image.mode if image.mode in ("L", "RGB") else None, (2 * size_hint[0], 2 * size_hint[1]))
        image.load()
    return image


@contextlib.contextmanager
def _decode_errors(name: str):
    """Pillow's ways of failing, as one ImageDecodeError (or ImageTooLargeError) line naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except PermissionError as exc:
        raise ImageDecodeError(f"cannot read image {name}: {exc.strerror}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image {name} is too large to decode ({exc}); resize it first") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image {name}: not a JPEG, PNG, BMP, GIF or WebP image. Use a PNG or JPEG "
                               "file.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode image {name}: {exc}. Use a PNG or JPEG file.") from None


def to_pixels(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert colour mode and resize to the spec; returns uint8 [H, W, C].

    Greyscale images inside an RGB set are replicated to three channels; RGB images in a greyscale
    set are converted with PIL's ITU-R 601-2 luma transform. The EXIF orientation is applied (phone
    photos are stored sideways); 16-bit and 32-bit greyscale are scaled to 0–255, not clipped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG opens as I;16 or I): 0–65535 → 0–255
        wide = np.asarray(image, dtype=np.float32)   # 4 bytes a pixel, not float64's 8
        image = Image.fromarray(np.clip(np.rint(wide * np.float32(255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.nan_to_num(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    size = (spec.width, spec.height)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency onto white so transparent backgrounds do not become black. Resized
        # first (Pillow resizes RGBA with premultiplied alpha, so the result is the same as
        # compositing first): no full-size copies of a large image with an alpha channel.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        if rgba.size != size:
            rgba = rgba.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert(spec.colour)
    if image.size != size:
        image = image.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def load_image(source: ImageSource, spec: InputSpec, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode one image and preprocess it: uint8 [H, W, C] as the model's input spec asks. With a
    budget, the decode waits until its pixels fit the budget and holds them until it is done."""
    image = peek_image(source)
    held = budget.hold(decode_cost(image)) if budget is not None else contextlib.nullcontext()
    with held:
        return to_pixels(_decode(image, _name(source), (spec.width, spec.height)), spec)


def load_images(sources: Sequence[ImageSource], spec: InputSpec, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode and preprocess several images: uint8 [N, H, W, C]."""
    if not sources:
        return np.zeros((0, spec.height, spec.width, spec.channels), np.uint8)
    return np.stack([load_image(s, spec, budget) for s in sources])


def check_pixels(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """An in-memory batch given instead of files: [N, H, W, C] for the spec, uint8, or a float/int
    array of finite values within 0–255 (the documented pixel range). Returned as given."""
    if not isinstance(pixels, np.ndarray):
        raise ImageDecodeError(f"pixel arrays must be numpy arrays, got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1:] != (spec.height, spec.width, spec.channels):
        raise ImageDecodeError(f"pixel arrays must be uint8 [N, {spec.height}, {spec.width}, {spec.channels}] "
                               f"for this bundle, got {list(pixels.shape)}")
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind not in "fiu":
        raise ImageDecodeError(f"pixel arrays must be uint8 (or numbers in 0–255), got dtype {pixels.dtype}")
    if pixels.size:
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            raise ImageDecodeError("pixel array holds NaN or infinite values; pixels must be finite, in 0–255")
        low, high = pixels.min(), pixels.max()
        if low < 0 or high > 255:
            raise ImageDecodeError(f"pixel values must lie in 0–255, this array spans {low:g}…{high:g}")
    return pixels


def pixels_to_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (or [H, W, C]) → float32 NCHW in [0, 255], the model's input tensor."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4:
        raise ImageDecodeError(f"expected images shaped [N, H, W, C], got {pixels.shape}")
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
