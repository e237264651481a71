"""Few-shot heads in NumPy: the device's twins of edgemeta.heads (torch), formula for formula.

A parity test feeds both the same features and requires the same logits, so the backbone is
meta-trained against exactly the adaptation the device runs. Features are float32 [n, D];
labels are 0..n_way-1. Linear solves run in float64 (the systems are tiny; it costs nothing and
keeps the closed forms stable); everything else runs in the features' dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

METRICS = ("euclidean", "cosine")
MAX_LOGISTIC_STEPS = 10_000
# steps × classes × shots × (dim + 1) multiply-adds: about a minute of one CPU core. A store of
# 10,000 one-shot classes with 10 steps is 5e11 and would run for many minutes; it is refused,
# naming the prototype and ridge heads, whose fits are one pass.
MAX_LOGISTIC_WORK = 2e11
LOGISTIC_BLOCK = 1 << 22   # classes × shots entries of the softmax held at once (16 MB of float32)
# Numeric settings and the range each may take: a store or manifest is data, not code — a crafted
# `steps: 1e9` must be refused, not run.
_BOUNDS = {"scale": (0.0, 1e6), "lambda": (1e-12, 1e12), "bias": (-1e6, 1e6), "steps": (0, MAX_LOGISTIC_STEPS),
           "lr": (0.0, 1e3), "momentum": (0.0, 1.0), "weight_decay": (0.0, 1e3), "shrinkage": (1e-6, 1.0)}


class NewerHeadError(ConfigError):
    """A head (or a head setting) a newer edgemeta wrote: the advice is to upgrade, not to restore."""


@dataclass(frozen=True)
class HeadConfig:
    """The head the device fits on support embeddings, and its settings: the one type checkpoints,
    manifests, stores, the CLI and both head implementations share. JSON form: to_dict/from_dict
    (only the kind's own keys; `lambda` for ridge_lambda)."""

    kind: str = "prototype"
    metric: str = "euclidean"      # prototype: euclidean | cosine
    scale: float = 1.0             # prototype, ridge: logits are multiplied by it
    ridge_lambda: float = 1.0      # ridge: L2 regulariser λ
    bias: float = 0.0              # ridge: added to the logits
    steps: int = 10                # logistic: SGD steps from the imprinted prototypes
    lr: float = 0.1                # logistic
    momentum: float = 0.9          # logistic: heavy-ball momentum
    weight_decay: float = 0.0      # logistic
    shrinkage: float = 0.5         # mahalanobis: weight of the isotropic target in the shared covariance
    flip_shots: bool = False       # any head: each support image's embedding is averaged with its mirror's

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"unknown head {self.kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if not isinstance(self.flip_shots, bool):
            raise ConfigError(f"flip_shots must be true or false, got {self.flip_shots!r}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        for key, (low, high) in _BOUNDS.items():
            value = getattr(self, _FIELD.get(key, key))
            whole = key == "steps"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                    or not np.isfinite(value) or not low <= value <= high:
                raise ConfigError(f"{key} must be {'a whole number' if whole else 'a number'} from {low:g} to {high:g}, "
                                  f"got {value!r}")

    @classmethod
    def from_dict(cls, d, where: str = "head") -> HeadConfig:
        """From the JSON form; unknown keys, bad kinds and out-of-range values raise ConfigError."""
        if isinstance(d, HeadConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: the head must be a JSON object, got {type(d).__name__}")
        kind = d.get("kind", "prototype")
        known = HEAD_KINDS.get(kind) if isinstance(kind, str) else None
        if known is None and isinstance(kind, str) and kind.isidentifier() and len(kind) <= 64:
            raise NewerHeadError(f"{where}: unknown head {kind!r} (this edgemeta has {', '.join(HEAD_KINDS)}); "
                                 "if a newer edgemeta wrote it, upgrade edgemeta")
        allowed = set(known.keys if known else ()) | {"kind", "init", "flip_shots"}  # "init": "prototype", the only one
        unknown = sorted(set(d) - allowed)
        known_anywhere = {"metric", *_BOUNDS}  # a setting of another head: a mistake, not a newer edgemeta
        if unknown and all(isinstance(k, str) and k.isidentifier() and len(k) <= 64 and k not in known_anywhere
                           for k in unknown):
            raise NewerHeadError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))} of the {kind!r} head; "
                                 "if a newer edgemeta wrote them, upgrade edgemeta")
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))} for a {kind!r} head")
        try:
            return cls(**{_FIELD.get(str(k), str(k)): v for k, v in d.items() if k != "init"})
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        d = {"kind": self.kind, **{k: getattr(self, _FIELD.get(k, k)) for k in HEAD_KINDS[self.kind].keys}}
        return {**d, "flip_shots": True} if self.flip_shots else d

    def for_normalized_embeddings(self) -> HeadConfig:
        """The head as deployed on L2-normalised embeddings: a prototype head compares by cosine
        (means of unit vectors are not unit vectors, so euclidean distance would rank differently)."""
        if self.kind == "prototype" and self.metric != "cosine":
            return HeadConfig(**{**self.__dict__, "metric": "cosine"})
        return self

    def rejection_metric(self, l2_normalized: bool) -> str:
        """The distance used for "unknown" rejection: the prototype head's own metric; otherwise
        cosine for L2-normalised embeddings, euclidean for the rest."""
        if self.kind == "prototype":
            return self.metric
        return "cosine" if l2_normalized else "euclidean"


_FIELD = {"lambda": "ridge_lambda"}


def resolve_head(default: HeadConfig, head: str | dict | HeadConfig | None) -> HeadConfig:
    """The head to use: None → `default` (a bundle's or checkpoint's); a kind name → `default` if it
    is that kind, else that kind's defaults; a dict or HeadConfig → itself (validated)."""
    if head is None:
        return default
    if not isinstance(head, str):
        return HeadConfig.from_dict(head)
    if head not in HEAD_KINDS:
        raise ConfigError(f"unknown head {head!r}; choose one of {', '.join(HEAD_KINDS)}")
    return default if default.kind == head else HeadConfig(kind=head)


def one_hot(labels: np.ndarray, n_way: int, dtype=np.float32) -> np.ndarray:
    return np.eye(n_way, dtype=dtype)[labels]


def class_sums(support: np.ndarray, labels: np.ndarray, n_way: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-class sums [n_way, D], counts [n_way]). Few-shot episodes take one one-hot product (the
    fastest at that size); large stores sum sorted rows, in memory linear in shots and classes (a
    dense one-hot is shots × classes: 1.6 GB at 20,000 one-shot classes)."""
    counts = np.bincount(labels, minlength=n_way)
    if len(labels) * n_way <= 1 << 16:
        return one_hot(labels, n_way, support.dtype).T @ support, counts
    sums = np.zeros((n_way, support.shape[1]), support.dtype)
    order = np.argsort(labels, kind="stable")
    present = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
    sums[present] = np.add.reduceat(support[order], starts, axis=0)
    return sums, counts


def class_means(support: np.ndarray, labels: np.ndarray, n_way: int) -> np.ndarray:
    sums, counts = class_sums(support, labels, n_way)
    return sums / np.maximum(counts, 1)[:, None].astype(support.dtype)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(1, keepdims=True)), 1e-12)  # np.linalg.norm's result, less overhead


def prototype_logits(query: np.ndarray, prototypes: np.ndarray, metric: str = "euclidean", scale: float = 1.0) -> np.ndarray:
    """−scale·‖q − p‖² or scale·cos(q, p): one formula, PreparedPrototypes' (which predict keeps per state)."""
    return PreparedPrototypes(prototypes, metric).logits(query, scale)


class PreparedPrototypes:
    """Prototypes ready to score queries fast and often (the device's predict): their transpose and
    squared norms (euclidean) or unit-normalised transpose (cosine) made once. logits(q, scale)
    equals prototype_logits(q, prototypes, metric, scale), with the scale folded into one multiply."""

    def __init__(self, prototypes: np.ndarray, metric: str):
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, not {metric!r}")
        self.metric = metric
        if metric == "cosine":
            self.t = np.ascontiguousarray(_normalize(prototypes).T)
        else:
            self.t = np.ascontiguousarray(prototypes.T)
            self.sq = (prototypes * prototypes).sum(1)

    def logits(self, query: np.ndarray, scale: float | np.floating = 1.0) -> np.ndarray:
        out = np.dot(query, self.t)
        if self.metric == "cosine":  # q·p / ‖q‖: the query's norm divides C logits, not D features
            if len(query) == 1:  # a camera frame: the norm as one Python float
                out *= scale / max(math.sqrt(float(np.dot(query[0], query[0]))), 1e-12)
            else:
                out *= scale / np.maximum(np.sqrt(np.einsum("ij,ij->i", query, query)), 1e-12)[:, None]
            return out
        out *= -2.0
        out += (query * query).sum(1, keepdims=True)
        out += self.sq
        return np.multiply(out, -scale, out=out)  # −scale·‖q − p‖²


def ridge_fit(support: np.ndarray, labels: np.ndarray, n_way: int, lam: float = 1.0) -> np.ndarray:
    """W [D, n_way] = (XᵀX + λI)⁻¹XᵀY, or the dual Xᵀ(XXᵀ + λI)⁻¹Y when shots < dim."""
    x = support.astype(np.float64)
    n, d = x.shape
    if n < d:  # n < d bounds the n × n system and the one-hot by d
        w = x.T @ np.linalg.solve(x @ x.T + lam * np.eye(n), one_hot(labels, n_way, np.float64))
    else:  # XᵀY is the per-class sums: memory linear in the classes
        w = np.linalg.solve(x.T @ x + lam * np.eye(d), class_sums(x, labels, n_way)[0].T)
    return w.astype(support.dtype)


def ridge_logits(query: np.ndarray, weights: np.ndarray, scale: float = 1.0, bias: float = 0.0) -> np.ndarray:
    return scale * (query @ weights) + bias


def imprinted_init(prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return 2.0 * prototypes, -(prototypes * prototypes).sum(1)


def logistic_logits(query: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return query @ weight.T + bias


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    e /= e.sum(1, keepdims=True)
    return e


def logistic_fit(support: np.ndarray, labels: np.ndarray, n_way: int, steps: int = 10, lr: float = 0.1,
                 weight: np.ndarray | None = None, bias: np.ndarray | None = None, momentum: float = 0.0,
                 weight_decay: float = 0.0, on_step: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k steps of SGD (heavy-ball momentum, L2 weight decay) on the mean softmax cross-entropy of
    the support set, from the imprinted prototypes unless (weight, bias) are given. `on_step(-1)` is
    called once the buffers are ready, then `on_step(i)` after each step, so callers can time every
    step apart from the set-up."""
    dtype = support.dtype
    n, d = support.shape
    work = float(steps) * n_way * n * (d + 1)
    if work > MAX_LOGISTIC_WORK:
        raise ConfigError(f"the logistic head's {steps} steps over {n_way:,} classes and {n:,} shots of dim {d} are "
                          f"{work:.2g} multiply-adds (limit {MAX_LOGISTIC_WORK:.0e}); use the prototype or ridge head "
                          "(one pass), or fewer steps")
    if weight is None or bias is None:
        weight, bias = imprinted_init(class_means(support, labels, n_way))
    # At few-shot sizes a step is bound by NumPy's per-call overhead, not by arithmetic, so a step is
    # 8 NumPy calls (9 with weight decay) writing into buffers made once, here:
    # - the bias rides as one more weight column against a column of ones, and the gradient's
    #   matmul runs against x·(lr/n), so it gives the step itself (the mean's 1/n and the step size
    #   folded in: the update is linear in the gradient);
    # - the gradient of the cross-entropy is Pᵀx − Yᵀx (P the softmax, Y the one-hot labels), and
    #   Yᵀx is constant;
    # - heavy-ball momentum as the last step taken, D' = m·D − step, w' = w + D': with w, D, Pᵀx
    #   and Yᵀx stacked in one buffer, one 2×4 matmul makes the next w and D at once.
    # The same arithmetic as torch.optim.SGD(momentum=m, weight_decay=λ) on the mean loss.
    x = np.ones((n, d + 1), dtype)
    x[:, :d] = support
    x_step = x * dtype.type(lr / n)
    slots = 5 if weight_decay else 4       # w, D, Pᵀx·lr/n, Yᵀx·lr/n[, decay ⊙ w]
    state, nxt = np.zeros((slots, n_way, d + 1), dtype), np.zeros((slots, n_way, d + 1), dtype)
    state[0, :, :d], state[0, :, d] = weight, bias
    state[3] = class_sums(x_step, labels, n_way)[0]   # Yᵀx·lr/n: per-class sums, memory linear in the classes
    nxt[3] = state[3]
    mix = np.array([[1, momentum, -1, 1, -lr / n], [0, momentum, -1, 1, -lr / n]], dtype)[:, :slots]
    if weight_decay:
        decay = np.full((n_way, d + 1), weight_decay * n, dtype)  # L2 on the weights, not the bias (× n, as
        decay[:, d] = 0                                            # the gradient is); full-size: no broadcasting
    x_t = np.ascontiguousarray(x.T)
    # classes × shots: the softmax reduces across rows, a vector op. Beyond LOGISTIC_BLOCK entries the
    # shots go through in blocks, so memory stays linear in classes + shots.
    block = n if n_way * n <= LOGISTIC_BLOCK else max(1, LOGISTIC_BLOCK // n_way)
    logits_flat, col_flat = np.empty(n_way * block, dtype), np.empty(block, dtype)
    logits_t, col = logits_flat.reshape(n_way, block), col_flat.reshape(1, block)
    # each buffer's views, made once: (w, the Pᵀx slot, the decay ⊙ w slot, all slots flat, w and D flat)
    views = [(buf[0], buf[2], buf[-1], buf.reshape(slots, -1), buf[:2].reshape(2, -1)) for buf in (state, nxt)]
    if on_step is not None:
        on_step(-1)  # set-up done: what follows is the steps alone
    for step in range(steps):
        w, grad_slot, decay_slot, flat, _ = views[step % 2]
        # np.dot and the ufuncs' own reduce: the same BLAS and loops as np.matmul, np.max and np.sum
        # with less call overhead each
        if block == n:
            np.dot(w, x_t, out=logits_t)
            np.maximum.reduce(logits_t, axis=0, keepdims=True, out=col)
            np.subtract(logits_t, col, out=logits_t)
            np.exp(logits_t, out=logits_t)
            np.add.reduce(logits_t, axis=0, keepdims=True, out=col)
            np.divide(logits_t, col, out=logits_t)   # the softmax Pᵀ
            np.dot(logits_t, x_step, out=grad_slot)
        else:
            grad_slot[...] = 0
            for j in range(0, n, block):
                m = min(block, n - j)
                part, c = logits_flat[:n_way * m].reshape(n_way, m), col_flat[:m].reshape(1, m)  # C-contiguous
                np.dot(w, x_t[:, j:j + m], out=part)
                np.maximum.reduce(part, axis=0, keepdims=True, out=c)
                np.subtract(part, c, out=part)
                np.exp(part, out=part)
                np.add.reduce(part, axis=0, keepdims=True, out=c)
                np.divide(part, c, out=part)
                grad_slot += part @ x_step[j:j + m]
        if weight_decay:
            np.multiply(w, decay, out=decay_slot)
        np.dot(mix, flat, out=views[1 - step % 2][4])
        if on_step is not None:
            on_step(step)
    state = (state, nxt)[steps % 2]
    w = state[0]
    return np.ascontiguousarray(w[:, :d]), w[:, d].copy()


# ---------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class HeadKind:
    """Everything the device needs to know about one kind of head, declared once. Adding a head is
    one module-level `register_head(HeadKind(...))` (plus its torch twin in edgemeta/heads.py's
    TORCH_HEADS, and its layers in export/freeze.py's FROZEN_HEADS — each table checked against this
    registry where it is defined, so a missing flavour fails at import): settings, fit, score, the shapes a
    saved head must have, and what the CLI's help says all come from here. Prototypes are always
    fitted besides (rejection distances are measured to them, whatever the head)."""

    name: str
    keys: tuple[str, ...]                                                   # its settings, by JSON name
    fit: Callable[[HeadConfig, np.ndarray, np.ndarray, int, np.ndarray], dict[str, np.ndarray]]
    score: Callable[[HeadConfig, dict[str, np.ndarray], np.ndarray], np.ndarray]
    shapes: Callable[[int, int], dict[str, tuple[int, ...]]]               # (n_way, dim) → array shapes
    about: str = ""


HEAD_KINDS: dict[str, HeadKind] = {}


def register_head(kind: HeadKind) -> HeadKind:
    if kind.name in HEAD_KINDS:
        raise ValueError(f"head {kind.name!r} is registered twice")
    unknown = set(kind.keys) - {"metric", *_BOUNDS}
    if unknown:
        raise ValueError(f"head {kind.name!r} declares settings HeadConfig does not have: {sorted(unknown)}")
    HEAD_KINDS[kind.name] = kind
    return kind


def head_names() -> tuple[str, ...]:
    return tuple(HEAD_KINDS)


def check_flavour(flavour: str, table: dict) -> None:
    """A head's other flavours (its torch twin, its frozen graph) are tables keyed by the head's name;
    each is checked against this registry where it is defined, so a head missing one fails at import."""
    missing, extra = sorted(set(HEAD_KINDS) - set(table)), sorted(set(table) - set(HEAD_KINDS))
    if missing or extra:
        raise ImportError(f"the {flavour} heads do not match the registered heads: missing {missing}, unregistered {extra}")


def shared_covariance_fit(support: np.ndarray, labels: np.ndarray, n_way: int, prototypes: np.ndarray,
                          shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear discriminant with a shrunk shared covariance (a Mahalanobis prototype head, as in
    Bateni et al. 2020 and SimpleShot's covariance variants): Σ = (1 − α)·S_w + α·σ²·I, S_w the
    pooled within-class scatter of the support set, σ² its average total variance (so a one-shot
    set, whose S_w is zero, reduces to euclidean prototypes at the data's own scale). Logits
    x·Σ⁻¹μ_c − ½ μ_cᵀΣ⁻¹μ_c: linear in x, (W [D, n_way], b [n_way]). Solved in float64."""
    x, mu = support.astype(np.float64), prototypes.astype(np.float64)
    n, d = x.shape
    centred = x - mu[labels]
    within = centred.T @ centred / max(n - n_way, 1)
    spread = x - x.mean(0)
    sigma2 = max(float((spread * spread).sum()) / max(n - 1, 1) / d, 1e-12)
    cov = (1.0 - shrinkage) * within + shrinkage * sigma2 * np.eye(d)
    w = np.linalg.solve(cov, mu.T)                                    # Σ⁻¹μ_c, [D, n_way]
    b = -0.5 * (mu.T * w).sum(0)
    return w.astype(support.dtype), b.astype(support.dtype)


register_head(HeadKind(
    "prototype", ("metric", "scale"),
    fit=lambda h, s, y, n, protos: {},
    score=lambda h, f, q: prototype_logits(q, f["prototypes"], h.metric, h.scale),
    shapes=lambda n, d: {},
    about="class means; euclidean or cosine"))
register_head(HeadKind(
    "ridge", ("lambda", "scale", "bias"),
    fit=lambda h, s, y, n, protos: {"weights": ridge_fit(s, y, n, h.ridge_lambda)},
    score=lambda h, f, q: ridge_logits(q, f["weights"], h.scale, h.bias),
    shapes=lambda n, d: {"weights": (d, n)},
    about="closed-form ridge regression (R2-D2)"))
register_head(HeadKind(
    "logistic", ("steps", "lr", "momentum", "weight_decay"),
    fit=lambda h, s, y, n, protos: dict(zip(("weight", "bias"), logistic_fit(
        s, y, n, h.steps, h.lr, *imprinted_init(protos), momentum=h.momentum, weight_decay=h.weight_decay))),
    score=lambda h, f, q: logistic_logits(q, f["weight"], f["bias"]),
    shapes=lambda n, d: {"weight": (n, d), "bias": (n,)},
    about="k SGD steps from the imprinted prototypes"))
register_head(HeadKind(
    "mahalanobis", ("shrinkage", "scale"),
    fit=lambda h, s, y, n, protos: dict(zip(("weights", "bias"), shared_covariance_fit(s, y, n, protos, h.shrinkage))),
    score=lambda h, f, q: h.scale * (q @ f["weights"] + f["bias"]),
    shapes=lambda n, d: {"weights": (d, n), "bias": (n,)},
    about="prototypes under a shrunk shared covariance"))


def fit(head: HeadConfig, support: np.ndarray, labels: np.ndarray, n_way: int) -> dict[str, np.ndarray]:
    """Fit the head: the arrays `score` needs. Prototypes are always included — the prototype head
    scores with them, and the device measures rejection distances to them whatever the head."""
    prototypes = class_means(support, labels, n_way)
    return {"prototypes": prototypes, **HEAD_KINDS[head.kind].fit(head, support, labels, n_way, prototypes)}


def fitted_shapes(head: HeadConfig, n_way: int, dim: int) -> dict[str, tuple[int, ...]]:
    """The arrays `fit` returns for this head, and their shapes (what a saved head must hold)."""
    return {"prototypes": (n_way, dim), **HEAD_KINDS[head.kind].shapes(n_way, dim)}


def score(head: HeadConfig, fitted: dict[str, np.ndarray], query: np.ndarray) -> np.ndarray:
    """Logits of the query under a fitted head."""
    return HEAD_KINDS[head.kind].score(head, fitted, query)


def head_logits(head: HeadConfig, support: np.ndarray, labels: np.ndarray, query: np.ndarray, n_way: int) -> np.ndarray:
    """Fit the head on the support set and score the query (one few-shot episode)."""
    return score(head, fit(head, support, labels, n_way), query)
