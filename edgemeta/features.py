"""Embedding-level utilities shared by training, evaluation, checkpoints and export: embed images
with a torch embedder, and CL2N (SimpleShot's centre-then-L2-normalise) with its feature mean."""
from __future__ import annotations

import numpy as np

from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.preprocess import pixels_to_batch

FEATURE_MEAN_KEY = "feature_mean"
FEATURE_MEAN_IMAGES = 10_000


def feature_mean(ckpt, embedder=None, max_images: int = FEATURE_MEAN_IMAGES) -> tuple[np.ndarray, dict]:
    """CL2N's center (SimpleShot): the mean embedding of the checkpoint's training classes — the one
    the checkpoint holds (`feature_mean`), else computed on up to `max_images` images (seeded
    sample) of its training split, read from its training data. Returns (mean, description)."""
    from edgemeta.data.loading import index_images
    from edgemeta.data.splits import split_classes
    if FEATURE_MEAN_KEY in ckpt.model_state:
        mean = ckpt.model_state[FEATURE_MEAN_KEY].float().numpy()
        return mean, {**ckpt.meta.get(FEATURE_MEAN_KEY, {}), "source": "checkpoint"}
    tc = ckpt.meta.get("train_config", {})
    if not tc.get("data"):
        raise ConfigError("this checkpoint holds no feature mean and names no training data to compute one")
    spec = ckpt.spec
    index = index_images(tc["data"], tc.get("layout", "auto"))  # only the sample is decoded
    classes = split_classes(index.groups, "train", tc.get("split_mode", "auto"), tc.get("split_seed", 0),
                            tc.get("split_file", ""))
    train = np.flatnonzero(np.isin(index.labels, classes))
    pick = train[np.sort(np.random.default_rng(0).choice(len(train), min(max_images, len(train)), replace=False))]
    pixels = index.decode(pick, spec).pixels
    z = embed_pixels(embedder if embedder is not None else ckpt.build_embedder(), pixels)
    return z.mean(0).astype(np.float32), {"images": int(len(pick)), "classes": len(classes), "split": "train"}


def cl2n(z: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Centre, then L2-normalise (the NumPy twin of the exported graph's last two steps)."""
    z = z - center
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def embed_pixels(embedder, pixels: np.ndarray, batch_size: int | None = None, device: str = "cpu") -> np.ndarray:
    """Embed uint8 [N, H, W, C] images in eval mode (torch, no gradients); returns float32 [N, D].
    By default in batches of 64 on a CPU, where they run as fast per image as 256 at a quarter of
    the memory (Lite2 at 224 px: 1.2 against 4.8 GB), and of 256 on an accelerator."""
    import torch
    with torch.no_grad():
        return _embed_pixels(embedder, pixels, batch_size or (64 if device == "cpu" else 256), device)


def _embed_pixels(embedder, pixels: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    import torch
    was_training = embedder.training
    embedder.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels_to_batch(pixels[i:i + batch_size])).to(device)
        out.append(embedder(x).float().cpu().numpy())
    embedder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
