"""The suite's one rule for numbers (docs/design.md, "Numbers in tests"): a float32 result is compared
with a float64 reference of the same computation, within a bound derived from the computation's
size and magnitude, never with a tolerance tuned on one CPU; what a user sees (labels, top-k order
away from ties) is compared exactly.

A dot product of n float32 terms, summed in any order (BLAS kernels differ between AVX2, AVX-512
and NEON), is within γ(n) · Σ|xᵢyᵢ| of the exact value, γ(n) = n·u / (1 − n·u), u = 2⁻²⁴ (Higham,
Accuracy and Stability of Numerical Algorithms, §3.1). `dot_bound` gives that bound; a result that
passes through k such stages has k of them (`stages`).
"""
from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = 2.0 ** -24  # float32


def gamma(n: int) -> float:
    nu = n * UNIT_ROUNDOFF
    return nu / (1 - nu)


def dot_bound(abs_products_sum: np.ndarray | float, n: int, stages: int = 1) -> np.ndarray:
    """The bound on a float32 dot product of n terms whose |terms| sum to `abs_products_sum`."""
    return stages * gamma(n) * np.asarray(abs_products_sum, np.float64)


def assert_within(got: np.ndarray, reference: np.ndarray, bound: np.ndarray | float, what: str) -> None:
    """|got − reference| ≤ bound elementwise (float64 reference), or a message naming the worst element."""
    got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), got.shape)
    err = np.abs(got - reference)
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: {got[i]!r} against the float64 reference {reference[i]!r} (error {err[i]:.3g}, "
                             f"bound {bound[i]:.3g} from the computation's size and magnitude)")


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def softmax_bound(probabilities: np.ndarray, logit_bound: np.ndarray) -> np.ndarray:
    """|Δpᵢ| ≤ pᵢ · (|Δzᵢ| + Σⱼ pⱼ|Δzⱼ|) ≤ 2·pᵢ·max|Δz| for logit errors ≤ logit_bound (per row), plus
    the exponentials' own rounding (a few u per term, C terms)."""
    p = np.asarray(probabilities, np.float64)
    worst = np.asarray(logit_bound, np.float64).reshape(len(p), -1).max(1, keepdims=True)
    return 2 * p * worst * np.exp(2 * worst) + 4 * gamma(p.shape[1] + 2) * p + UNIT_ROUNDOFF
