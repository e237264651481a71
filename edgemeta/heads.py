"""Few-shot heads in torch, differentiable, for meta-training.

Each function has a NumPy twin in edgemeta.runtime.heads with the same formula written the same
way; a parity test holds them together. Features are [n, D]; labels are 0..n_way-1.

  prototype  class means; logits = −scale·‖q − p‖² (expanded, no cdist) or scale·cos(q, p)
  ridge      W = (XᵀX + λI)⁻¹XᵀY, or its dual Xᵀ(XXᵀ + λI)⁻¹Y when shots < dim (R2-D2);
             logits = scale·qW + bias
  logistic   k steps of (momentum) SGD on softmax cross-entropy with the gradient written out,
             so the steps unroll for meta-learning and the device runs the same arithmetic
  mahalanobis  prototypes under a shrunk shared covariance; logits = scale·(qΣ⁻¹μ − ½μᵀΣ⁻¹μ)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from edgemeta.runtime.heads import HeadConfig, check_flavour

METRICS = ("euclidean", "cosine")


def one_hot(labels: torch.Tensor, n_way: int, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(labels, n_way).to(dtype)


def class_means(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Prototypes [n_way, D]: the mean support embedding of each class."""
    y = one_hot(labels, n_way, support.dtype)
    return (y.T @ support) / y.sum(0).clamp_min(1).unsqueeze(1)


def prototype_logits(query: torch.Tensor, prototypes: torch.Tensor, metric: str = "euclidean",
                     scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    if metric == "euclidean":
        sq = (query * query).sum(1, keepdim=True) - 2.0 * query @ prototypes.T + (prototypes * prototypes).sum(1)
        return -scale * sq
    if metric == "cosine":
        return scale * (F.normalize(query, dim=1, eps=1e-12) @ F.normalize(prototypes, dim=1, eps=1e-12).T)
    raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")


def ridge_fit(support: torch.Tensor, labels: torch.Tensor, n_way: int, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Closed-form ridge regression onto one-hot targets: W [D, n_way].

    The dual (Woodbury) form solves an n×n system instead of D×D; both give the same W. The solve
    runs in float64 (tiny systems; stable closed form), as the NumPy twin does.
    """
    x, y = support.double(), one_hot(labels, n_way, torch.float64)
    n, d = x.shape
    if n < d:
        w = x.T @ torch.linalg.solve(x @ x.T + lam * torch.eye(n, dtype=x.dtype, device=x.device), y)
    else:
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=x.dtype, device=x.device), x.T @ y)
    return w.to(support.dtype)


def ridge_logits(query: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | float = 1.0,
                 bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    return scale * (query @ weights) + bias


def imprinted_init(prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic head (W [n_way, D], b [n_way]) whose logits equal the euclidean prototype logits
    up to a per-query constant: W = 2p, b = −‖p‖² (weight imprinting)."""
    return 2.0 * prototypes, -(prototypes * prototypes).sum(1)


def logistic_logits(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return query @ weight.T + bias


def logistic_fit(support: torch.Tensor, labels: torch.Tensor, n_way: int, steps: int = 10, lr: float = 0.1,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """k steps of SGD (with optional heavy-ball momentum and L2 weight decay) on the mean softmax
    cross-entropy of the support set. Starts from the imprinted prototypes unless (weight, bias)
    are given. Differentiable with respect to the support features and the initialisation."""
    if weight is None or bias is None:
        weight, bias = imprinted_init(class_means(support, labels, n_way))
    y = one_hot(labels, n_way, support.dtype)
    n = support.shape[0]
    vel_w = torch.zeros_like(weight)
    vel_b = torch.zeros_like(bias)
    for _ in range(steps):
        probs = torch.softmax(logistic_logits(support, weight, bias), dim=1)
        grad_logits = (probs - y) / n
        grad_w = grad_logits.T @ support + weight_decay * weight
        grad_b = grad_logits.sum(0)
        vel_w = momentum * vel_w + grad_w
        vel_b = momentum * vel_b + grad_b
        weight = weight - lr * vel_w
        bias = bias - lr * vel_b
    return weight, bias


def shared_covariance_fit(support: torch.Tensor, labels: torch.Tensor, n_way: int, prototypes: torch.Tensor,
                          shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of runtime.heads.shared_covariance_fit: Σ = (1 − α)·S_w + α·σ²·I; (Σ⁻¹μ_c, −½ μ_cᵀΣ⁻¹μ_c)."""
    x, mu = support.double(), prototypes.double()
    n, d = x.shape
    centred = x - mu[labels]
    within = centred.T @ centred / max(n - n_way, 1)
    spread = x - x.mean(0)
    sigma2 = ((spread * spread).sum() / max(n - 1, 1) / d).clamp_min(1e-12)
    cov = (1.0 - shrinkage) * within + shrinkage * sigma2 * torch.eye(d, dtype=x.dtype, device=x.device)
    w = torch.linalg.solve(cov, mu.T)
    return w.to(support.dtype), (-0.5 * (mu.T * w).sum(0)).to(support.dtype)


# The torch flavour of each registered head (runtime.heads.HEAD_KINDS), keyed by the head's name as
# timm keys its activation flavours: (head, support, labels, query, n_way, scale, bias) → logits.
TorchHead = Callable[[HeadConfig, torch.Tensor, torch.Tensor, torch.Tensor, int, Any, Any], torch.Tensor]


def _prototype(h, s, y, q, n, scale, bias):
    return prototype_logits(q, class_means(s, y, n), h.metric, scale)


def _ridge(h, s, y, q, n, scale, bias):
    return ridge_logits(q, ridge_fit(s, y, n, h.ridge_lambda), scale, h.bias if bias is None else bias)


def _mahalanobis(h, s, y, q, n, scale, bias):
    w, b = shared_covariance_fit(s, y, n, class_means(s, y, n), h.shrinkage)
    return scale * (q @ w + b)


def _logistic(h, s, y, q, n, scale, bias):
    w, b = logistic_fit(s, y, n, h.steps, h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
    return logistic_logits(q, w, b)


TORCH_HEADS: dict[str, TorchHead] = {"prototype": _prototype, "ridge": _ridge, "mahalanobis": _mahalanobis,
                                     "logistic": _logistic}
check_flavour("torch (edgemeta/heads.py, TORCH_HEADS)", TORCH_HEADS)


def head_logits(head: HeadConfig, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int,
                scale: torch.Tensor | float | None = None, bias: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fit the head a HeadConfig describes (the device's head, in torch) and return query logits.
    Learnable scale/bias tensors may override the config's."""
    return TORCH_HEADS[head.kind](head, support, labels, query, n_way, head.scale if scale is None else scale, bias)
