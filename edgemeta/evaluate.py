"""Evaluate a checkpoint (torch) with the few-shot protocol of edgemeta.protocol."""
from __future__ import annotations

import numpy as np
import torch

from edgemeta.heads import head_logits
from edgemeta.protocol import LogitsFn
from edgemeta.runtime.preprocess import pixels_to_batch


@torch.no_grad()
def embed_pixels(embedder: torch.nn.Module, pixels: np.ndarray, batch_size: int = 256,
                 device: str = "cpu") -> np.ndarray:
    """Embed uint8 [N, H, W, C] images in eval mode; returns float32 [N, D]."""
    was_training = embedder.training
    embedder.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels_to_batch(pixels[i:i + batch_size])).to(device)
        out.append(embedder(x).float().cpu().numpy())
    embedder.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def torch_logits_fn(head: dict) -> LogitsFn:
    """The torch head (edgemeta.heads) described by a head config, as a NumPy-in/NumPy-out function."""
    def fn(support, support_labels, query, n_way):
        with torch.no_grad():
            return head_logits(head, torch.from_numpy(support), torch.from_numpy(support_labels),
                               torch.from_numpy(query), n_way).numpy()
    return fn
