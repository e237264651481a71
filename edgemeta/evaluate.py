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


def adaptation_logits_fn(model: torch.nn.Module, device: str = "cpu") -> LogitsFn:
    """Episodes scored by the algorithm's own adaptation (MAML/FOMAML/Reptile fine-tune the network,
    ANIL the head) on PIXELS: evaluate_episodes is given uint8 images instead of embeddings."""
    def fn(support, support_labels, query, n_way):
        t = lambda a: torch.from_numpy(pixels_to_batch(a)).to(device)  # noqa: E731
        logits = model.logits_after_adaptation(t(support), torch.from_numpy(support_labels).to(device), t(query))
        return logits.cpu().numpy()
    return fn


def load_adaptation_model(ckpt) -> torch.nn.Module:
    """Rebuild a gradient-based algorithm (backbone + head + inner-loop settings) from a checkpoint."""
    from edgemeta.algorithms import create_algorithm
    from edgemeta.backbones import Embedder
    tc = ckpt.meta["train_config"]
    # evaluation runs on the CPU: NHWC activations there (see Embedder)
    embedder = Embedder(ckpt.meta["backbone"]["name"], ckpt.spec, ckpt.meta["backbone"].get("args", {}),
                        channels_last=True)
    model = create_algorithm(ckpt.meta["algorithm"], embedder, n_way=tc["way"], inner_steps=tc["inner_steps"],
                             inner_lr=tc["inner_lr"], learn_inner_lr=tc.get("learn_inner_lr", False),
                             reptile_epsilon=tc.get("reptile_epsilon", 1.0))
    state = {k: v for k, v in ckpt.model_state.items() if "running_" not in k and "num_batches_tracked" not in k}
    model.load_state_dict(state)
    return model.eval()
