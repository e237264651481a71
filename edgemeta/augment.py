"""Training-time augmentation for natural images: random crop with padding, horizontal flip,
colour jitter. Applied inside the training loop only — never at enrollment or evaluation, where
images go through edgemeta.runtime.preprocess alone. Works on pixel batches [N, C, H, W] in
0–255 before the model's normalisation; seeded by a torch.Generator."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
                  jitter: float = 0.4) -> torch.Tensor:
    n, c, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, c, h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, c, h, w)
        x = x.gather(3, cols)
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if jitter:
        factor = lambda: 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter  # noqa: E731
        x = x * factor()                                                     # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean                                     # contrast
        if c == 3:
            grey = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - grey) * factor() + grey                                 # saturation
        x = x.clamp(0, 255)
    return x
