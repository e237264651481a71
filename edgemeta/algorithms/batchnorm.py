"""BatchNorm in meta-learning: batch statistics per task (the MAML convention), several tasks'
statistics in one batch, and running statistics recomputed for the exported backbone."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def use_batch_statistics(module: nn.Module) -> None:
    """BatchNorm layers normalise with each batch's statistics and keep no running statistics
    (required under vmap, and the MAML convention)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None


@torch.no_grad()
def recalibrate_batchnorm(embedder: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Running statistics for every BatchNorm layer, averaged over `batches` of training images
    (cumulative mean). Returns them as state-dict entries; the module itself is left unchanged."""
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in embedder.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inp, out, name=name):
                x = inp[0]
                dims = [0, 2, 3]
                stats.setdefault(name, []).append(torch.stack([x.mean(dims), x.var(dims, unbiased=True)]))
            hooks.append(m.register_forward_hook(hook))
    was_training = embedder.training
    embedder.train()
    for x in batches:
        embedder(x)
    embedder.train(was_training)
    for h in hooks:
        h.remove()
    out = {}
    for name, values in stats.items():
        mean, var = torch.stack(values).mean(0)
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean, var
        out[f"{name}.num_batches_tracked"] = torch.tensor(len(values))
    return out


class TaskBatchNorm:
    """Context manager: every BatchNorm layer of `module` normalises each task's images with that
    task's own statistics while the images of T tasks run through the network as ONE batch
    [T·B, C, H, W]. Same numbers as T separate forward passes; one large convolution instead of T
    small ones (what pays on a GPU; on this CPU it measured slower, benchmarks/maml_speed.py)."""

    def __init__(self, module: nn.Module, tasks: int):
        self.layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.tasks = tasks

    def __enter__(self):
        for m in self.layers:
            m.forward = self._grouped(m)
        return self

    def _grouped(self, m):
        tasks = self.tasks

        def forward(x):
            # [T·B, C, …] → [B, T·C, …]: each (task, channel) pair becomes a channel of one native,
            # fused batch_norm call with batch statistics
            n, c = x.shape[:2]
            rest = x.shape[2:]
            y = x.reshape(tasks, n // tasks, c, *rest).transpose(0, 1).reshape(n // tasks, tasks * c, *rest)
            y = F.batch_norm(y, None, None, m.weight.repeat(tasks), m.bias.repeat(tasks), training=True, eps=m.eps)
            return y.reshape(n // tasks, tasks, c, *rest).transpose(0, 1).reshape(x.shape)
        return forward

    def __exit__(self, *exc):
        for m in self.layers:
            del m.forward  # back to the class's forward
