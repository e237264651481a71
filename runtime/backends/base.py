"""The one interface every backend implements: embed a float32 NCHW batch of decoded pixels."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..preprocess import InputSpec, pixels_to_batch

# The largest batch edgemeta hands a backend in one call: embed_pixels and the frozen classifier chunk
# by it, the service's --max-batch stops at it, and TensorRT profiles (engines, ONNX Runtime's TensorRT
# provider) are built up to it, so no call ever falls outside a profile. One place to change it.
MAX_BATCH = 64


class Backend(ABC):
    """Run the bundle's embedding network. Usable as a context manager."""

    name: str = "backend"
    # Which of the bundle's graphs produces the embeddings (fp32, fp16, int8, or int8-cpu: the U8S8
    # graph ONNX Runtime runs on a CPU). A store records it: embeddings of two graphs never mix.
    graph: str = ""

    def __init__(self, spec: InputSpec, embedding_dim: int):
        self.spec, self.embedding_dim = spec, embedding_dim

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] → float32 [N, D], N within what the backend accepts."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1:] != (self.spec.channels, self.spec.height, self.spec.width):
            from ..errors import ImageDecodeError
            raise ImageDecodeError(f"expected a batch shaped [N, {self.spec.channels}, {self.spec.height}, "
                                   f"{self.spec.width}], got {list(batch.shape)}")
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = MAX_BATCH) -> np.ndarray:
        """Embed decoded uint8 images [N, H, W, C] in batches: float32 [N, D]."""
        if 0 < len(pixels) <= batch_size:  # one call: no output buffer to fill and copy
            return self.embed(pixels_to_batch(pixels))
        out = np.empty((len(pixels), self.embedding_dim), np.float32)
        for i in range(0, len(pixels), batch_size):
            out[i:i + batch_size] = self.embed(pixels_to_batch(pixels[i:i + batch_size]))
        return out

    def run_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every named output of one call, for a backend opened with `outputs` (a frozen classifier's
        probabilities [N, C] and distance [N])."""
        from ..errors import BundleError
        raise BundleError(f"the {self.name} backend runs single-output graphs only")

    @property
    def on_gpu(self) -> bool:
        """Whether the network runs on an accelerator (batching then pays: a call of 16 costs little
        more than one of 1). Each backend says so itself."""
        return False

    def close(self) -> None:  # noqa: B027 - a backend that holds no device resources has nothing to free
        """Free device memory and sessions; the backend is unusable afterwards."""

    def describe(self) -> dict:
        return {"backend": self.name}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
