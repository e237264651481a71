"""Few-shot heads in NumPy: the device's twins of edgemeta.heads (torch), formula for formula.

A parity test feeds both the same features and requires the same logits, so the backbone is
meta-trained against exactly the adaptation the device runs. Features are float32 [n, D];
labels are 0..n_way-1. Linear solves run in float64 (the systems are tiny; it costs nothing and
keeps the closed forms stable); everything else runs in the features' dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import ConfigError

METRICS = ("euclidean", "cosine")
HEADS = ("prototype", "ridge", "logistic")
MAX_LOGISTIC_STEPS = 10_000
# Numeric head settings and the range each may take (a store or manifest is data, not code: a
# crafted `steps: 1e9` must be refused, not run).
_HEAD_BOUNDS = {"scale": (0.0, 1e6), "lambda": (1e-12, 1e12), "bias": (-1e6, 1e6), "steps": (0, MAX_LOGISTIC_STEPS),
                "lr": (0.0, 1e3), "momentum": (0.0, 1.0), "weight_decay": (0.0, 1e3)}


def check_head(head, where: str = "head") -> dict:
    """Validate a head config (checkpoint / manifest / store format) and return it; ConfigError
    naming `where` and the bad field otherwise."""
    if not isinstance(head, dict):
        raise ConfigError(f"{where}: the head must be a JSON object, got {type(head).__name__}")
    kind = head.get("kind", "prototype")
    if kind not in HEADS:
        raise ConfigError(f"{where}: unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    if head.get("metric", "euclidean") not in METRICS:
        raise ConfigError(f"{where}: metric must be one of {', '.join(METRICS)}, not {head.get('metric')!r}")
    if head.get("optimizer", "sgd") not in ("sgd", "adam"):
        raise ConfigError(f"{where}: optimizer must be sgd or adam, not {head.get('optimizer')!r}")
    for name, (low, high) in _HEAD_BOUNDS.items():
        if name not in head:
            continue
        value = head[name]
        whole = name == "steps"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not np.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{where}: {name} must be {'a whole number' if whole else 'a number'} "
                              f"from {low:g} to {high:g}, got {value!r}")
    return head


def one_hot(labels: np.ndarray, n_way: int, dtype=np.float32) -> np.ndarray:
    return np.eye(n_way, dtype=dtype)[labels]


def class_means(support: np.ndarray, labels: np.ndarray, n_way: int) -> np.ndarray:
    y = one_hot(labels, n_way, support.dtype)
    return (y.T @ support) / np.maximum(y.sum(0), 1)[:, None]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_logits(query: np.ndarray, prototypes: np.ndarray, metric: str = "euclidean", scale: float = 1.0) -> np.ndarray:
    if metric == "euclidean":
        sq = (query * query).sum(1, keepdims=True) - 2.0 * query @ prototypes.T + (prototypes * prototypes).sum(1)
        return -scale * sq
    if metric == "cosine":
        return scale * (_normalize(query) @ _normalize(prototypes).T)
    raise ConfigError(f"metric must be one of {METRICS}, not {metric!r}")


def ridge_fit(support: np.ndarray, labels: np.ndarray, n_way: int, lam: float = 1.0) -> np.ndarray:
    """W [D, n_way] = (XᵀX + λI)⁻¹XᵀY, or the dual Xᵀ(XXᵀ + λI)⁻¹Y when shots < dim."""
    x = support.astype(np.float64)
    y = one_hot(labels, n_way, np.float64)
    n, d = x.shape
    if n < d:
        w = x.T @ np.linalg.solve(x @ x.T + lam * np.eye(n), y)
    else:
        w = np.linalg.solve(x.T @ x + lam * np.eye(d), x.T @ y)
    return w.astype(support.dtype)


def ridge_logits(query: np.ndarray, weights: np.ndarray, scale: float = 1.0, bias: float = 0.0) -> np.ndarray:
    return scale * (query @ weights) + bias


def imprinted_init(prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 2.0 * prototypes, -(prototypes * prototypes).sum(1)


def logistic_logits(query: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return query @ weight.T + bias


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def logistic_fit(support: np.ndarray, labels: np.ndarray, n_way: int, steps: int = 10, lr: float = 0.1,
                 weight: np.ndarray | None = None, bias: np.ndarray | None = None, momentum: float = 0.0,
                 weight_decay: float = 0.0, optimizer: str = "sgd", betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, on_step: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k steps of SGD (heavy-ball momentum, L2 weight decay) or Adam on the mean softmax
    cross-entropy of the support set, from the imprinted prototypes unless (weight, bias) are
    given. `on_step(i)` is called after each step, so callers can time every step."""
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"optimizer must be sgd or adam, not {optimizer!r}")
    if weight is None or bias is None:
        weight, bias = imprinted_init(class_means(support, labels, n_way))
    weight, bias = weight.astype(support.dtype, copy=True), bias.astype(support.dtype, copy=True)
    y = one_hot(labels, n_way, support.dtype)
    inv_n = support.dtype.type(1.0 / support.shape[0])
    m_w, m_b = np.zeros_like(weight), np.zeros_like(bias)
    v_w, v_b = (np.zeros_like(weight), np.zeros_like(bias)) if optimizer == "adam" else (None, None)
    # In-place updates: at few-shot sizes the step is bound by NumPy call overhead, not arithmetic.
    for step in range(steps):
        logits = support @ weight.T
        logits += bias
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        logits -= y
        logits *= inv_n                      # gradient of the mean cross-entropy w.r.t. the logits
        grad_w = logits.T @ support
        if weight_decay:
            grad_w += weight_decay * weight
        grad_b = logits.sum(0)
        if optimizer == "sgd":
            if momentum:
                m_w *= momentum
                m_w += grad_w
                m_b *= momentum
                m_b += grad_b
                grad_w, grad_b = m_w, m_b
            weight -= lr * grad_w
            bias -= lr * grad_b
        else:
            b1, b2 = betas
            m_w, m_b = b1 * m_w + (1 - b1) * grad_w, b1 * m_b + (1 - b1) * grad_b
            v_w, v_b = b2 * v_w + (1 - b2) * grad_w ** 2, b2 * v_b + (1 - b2) * grad_b ** 2
            c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
            weight -= lr * (m_w / c1) / (np.sqrt(v_w / c2) + eps)
            bias -= lr * (m_b / c1) / (np.sqrt(v_b / c2) + eps)
        if on_step is not None:
            on_step(step)
    return weight, bias


def fit(head: dict, support: np.ndarray, labels: np.ndarray, n_way: int) -> dict[str, np.ndarray]:
    """Fit the head described by a head config (checkpoint / manifest format): the arrays `score`
    needs. Prototypes are always included — the prototype head scores with them, and the device
    measures rejection distances to them whatever the head."""
    kind = head.get("kind", "prototype")
    fitted = {"prototypes": class_means(support, labels, n_way)}
    if kind == "ridge":
        fitted["weights"] = ridge_fit(support, labels, n_way, head.get("lambda", 1.0))
    elif kind == "logistic":
        fitted["weight"], fitted["bias"] = logistic_fit(
            support, labels, n_way, head.get("steps", 10), head.get("lr", 0.1), momentum=head.get("momentum", 0.0),
            weight_decay=head.get("weight_decay", 0.0), optimizer=head.get("optimizer", "sgd"))
    elif kind != "prototype":
        raise ConfigError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return fitted


def score(head: dict, fitted: dict[str, np.ndarray], query: np.ndarray) -> np.ndarray:
    """Logits of the query under a fitted head."""
    kind = head.get("kind", "prototype")
    scale = head.get("scale", 1.0)
    if kind == "prototype":
        return prototype_logits(query, fitted["prototypes"], head.get("metric", "euclidean"), scale)
    if kind == "ridge":
        return ridge_logits(query, fitted["weights"], scale, head.get("bias", 0.0))
    return logistic_logits(query, fitted["weight"], fitted["bias"])


def head_logits(head: dict, support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int) -> np.ndarray:
    """Fit the head on the support set and score the query (one few-shot episode)."""
    return score(head, fit(head, support, labels, n_way), query)
