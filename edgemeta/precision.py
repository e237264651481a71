"""Training precision: float32, or bfloat16 mixed precision (autocast).

bf16 runs the convolutions and matmuls of the training step in bfloat16 — where the hardware has
bf16 arithmetic (AVX512-BF16 / AMX CPUs, Ampere-or-later GPUs) about twice the float32 rate on
this project's backbones — while the weights, their gradients, the optimiser and the checkpoint
stay float32. Validation, evaluation and export always run float32. No loss scaling: bfloat16
has float32's exponent range.
"""
from __future__ import annotations

import torch


def native_bf16(device: str) -> bool:
    """Whether `device` computes in bfloat16 natively (elsewhere bf16 works, emulated and slow)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(precision: str, device: str) -> torch.autocast:
    """The context the training step's forward runs in (a no-op for fp32)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16")
