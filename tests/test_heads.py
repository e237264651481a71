import numpy as np
import pytest
import torch
from edgemeta.runtime import heads as nh
from edgemeta.runtime.errors import ConfigError
from edgemeta.runtime.heads import HeadConfig, resolve_head
from numeric import assert_within, dot_bound

from edgemeta import heads as th


def _features(n_way=5, shot=3, dim=16, query=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n_way * shot, dim, generator=g, dtype=dtype)
    y = torch.arange(n_way).repeat_interleave(shot)
    q = torch.randn(n_way * query, dim, generator=g, dtype=dtype)
    return s, y, q


def test_euclidean_prototype_logits_equal_negative_squared_distances():
    s, y, q = _features()
    p = th.class_means(s, y, 5)
    assert torch.allclose(p[2], s[6:9].mean(0))
    assert torch.allclose(th.prototype_logits(q, p, "euclidean", 2.0), -2.0 * torch.cdist(q, p) ** 2, atol=1e-9)


def test_cosine_logits_are_scaled_cosines():
    s, y, q = _features()
    p = th.class_means(s, y, 5)
    expected = 10 * torch.nn.functional.cosine_similarity(q[:, None], p[None], dim=2)
    assert torch.allclose(th.prototype_logits(q, p, "cosine", 10.0), expected, atol=1e-9)


@pytest.mark.parametrize("shot,dim", [(1, 64), (10, 8)])  # dual form (n < d) and primal form (n ≥ d)
def test_ridge_matches_a_direct_solve_of_the_primal(shot, dim):
    s, y, _ = _features(shot=shot, dim=dim)
    lam = 0.7
    w = th.ridge_fit(s, y, 5, lam)
    onehot = torch.nn.functional.one_hot(y, 5).double()
    direct = torch.linalg.solve(s.T @ s + lam * torch.eye(dim, dtype=s.dtype), s.T @ onehot)
    assert torch.allclose(w, direct, atol=1e-8)


@pytest.mark.parametrize("kind", nh.head_names())
def test_heads_pass_gradients_to_the_features(kind):
    s, y, q = _features(dtype=torch.float32)
    s.requires_grad_(True)
    q.requires_grad_(True)
    logits = th.head_logits(HeadConfig(kind=kind, steps=3), s, y, q, 5)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(5).repeat_interleave(4))
    loss.backward()
    assert s.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_imprinted_logistic_head_starts_as_the_prototype_classifier():
    s, y, q = _features()
    p = th.class_means(s, y, 5)
    w, b = th.imprinted_init(p)
    diff = th.logistic_logits(q, w, b) - th.prototype_logits(q, p)
    # equal up to a per-query constant (‖q‖²), so the same class wins
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-9)


def test_logistic_sgd_steps_lower_the_support_loss():
    s, y, _ = _features(dtype=torch.float32)
    losses = []
    for steps in (0, 5, 20):
        w, b = th.logistic_fit(s / 4, y, 5, steps=steps, lr=0.5)
        losses.append(float(torch.nn.functional.cross_entropy(th.logistic_logits(s / 4, w, b), y)))
    assert losses[0] > losses[1] > losses[2]


def test_logistic_gradient_formula_equals_autograd():
    s, y, _ = _features(dtype=torch.float64)
    w0, b0 = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    w1, b1 = th.logistic_fit(s, y, 5, steps=1, lr=1.0, weight=w0, bias=b0, weight_decay=0.1)
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(th.logistic_logits(s, w, b), y) + 0.05 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert torch.allclose(w1, w0 - gw, atol=1e-10) and torch.allclose(b1, b0 - gb, atol=1e-10)


@pytest.mark.parametrize("head", [
    {"kind": "prototype", "metric": "euclidean", "scale": 1.0},
    {"kind": "prototype", "metric": "cosine", "scale": 12.5},
    {"kind": "ridge", "lambda": 0.5, "scale": 7.0, "bias": 0.3},
    {"kind": "ridge", "lambda": 2.0, "scale": 1.0, "bias": 0.0},
    {"kind": "logistic", "steps": 10, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    {"kind": "mahalanobis", "shrinkage": 0.5, "scale": 1.0},
    {"kind": "mahalanobis", "shrinkage": 0.1, "scale": 3.0},
])
@pytest.mark.parametrize("shot", [1, 5])
def test_numpy_and_torch_heads_give_the_same_logits(head, shot):
    """Both float32 implementations against the float64 reference of the same head (tests/numeric.py):
    within the bound the computation's size, magnitude and conditioning give; the labels exactly."""
    s, y, q = _features(shot=shot, dim=64, dtype=torch.float32, seed=shot)
    s, q = s.abs(), q.abs()  # post-ReLU-like features
    head = HeadConfig.from_dict(head)
    reference = th.head_logits(head, s.double(), y, q.double(), 5).numpy()
    bound = head_logit_bound(head, s.double().numpy(), y.numpy(), q.double().numpy(), 5)
    torch32 = th.head_logits(head, s, y, q, 5).numpy()
    got = nh.head_logits(head, s.numpy(), y.numpy(), q.numpy(), 5)
    assert got.dtype == np.float32
    assert_within(got, reference, bound, f"NumPy {head.kind} logits")
    assert_within(torch32, reference, bound, f"torch {head.kind} logits")
    apart = np.sort(reference, 1)[:, -1] - np.sort(reference, 1)[:, -2] > 2 * bound.max(1)
    assert apart.any() and (got.argmax(1) == reference.argmax(1))[apart].all()


def head_logit_bound(head, s: np.ndarray, y: np.ndarray, q: np.ndarray, n_way: int) -> np.ndarray:
    """The float32 rounding bound of each logit: γ(terms) × the magnitude Σ|q||W| + |b| of the float64
    fit's arrays × its stages, × the condition number of the system a closed-form head solves (ridge:
    the Gram matrix; mahalanobis: the shrunk covariance), × the steps an SGD head takes."""
    fitted = nh.fit(head, s, y, n_way)
    n, d = s.shape
    stages, kappa = 4, 1.0
    if head.kind == "prototype":
        p = fitted["prototypes"]
        if head.metric == "cosine":
            u, pn = q / np.linalg.norm(q, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
            mag = head.scale * np.abs(u) @ np.abs(pn).T
        else:
            mag = head.scale * (2 * np.abs(q) @ np.abs(p).T + (p * p).sum(1) + (q * q).sum(1, keepdims=True))
    elif head.kind == "logistic":
        w, b = fitted["weight"], fitted["bias"]
        mag = np.abs(q) @ np.abs(w).T + np.abs(b)
        kappa = head.steps + 1
    else:
        w = fitted["weights"]
        b = fitted.get("bias", np.full(n_way, head.bias))
        mag = abs(head.scale) * (np.abs(q) @ np.abs(w) + np.abs(b))
        if head.kind == "ridge":
            gram = s @ s.T if n < d else s.T @ s
            kappa = np.linalg.cond(gram + head.ridge_lambda * np.eye(len(gram)))
        else:
            mu = fitted["prototypes"]
            centred = s - mu[y]
            within = centred.T @ centred / max(n - n_way, 1)
            spread = s - s.mean(0)
            sigma2 = (spread * spread).sum() / max(n - 1, 1) / d
            kappa = np.linalg.cond((1 - head.shrinkage) * within + head.shrinkage * sigma2 * np.eye(d))
    return dot_bound(mag, n + d, stages) * kappa


def test_head_config_is_one_validated_type_with_one_set_of_defaults():
    for d in ({"kind": "prototype", "metric": "cosine", "scale": 10.0}, {"kind": "ridge", "lambda": 0.5, "scale": 2.0, "bias": 0.1},
              {"kind": "logistic", "steps": 5, "lr": 0.2, "momentum": 0.0, "weight_decay": 0.0}):
        assert HeadConfig.from_dict(d).to_dict() == d
    # a logistic head without a momentum gets the one default, whichever implementation runs it
    assert HeadConfig.from_dict({"kind": "logistic"}).momentum == HeadConfig(kind="logistic").momentum == 0.9
    assert resolve_head(HeadConfig(metric="cosine"), "prototype").metric == "cosine"
    assert resolve_head(HeadConfig(metric="cosine"), "ridge") == HeadConfig(kind="ridge")
    for bad, why in (({"kind": "svm"}, "unknown head"), ({"kind": "ridge", "steps": 3}, "unknown setting"),
                     ({"kind": "prototype", "metric": "manhattan"}, "metric"),
                     ({"kind": "logistic", "steps": 2.5}, "whole number"), ({"kind": "ridge", "lambda": -1}, "lambda")):
        with pytest.raises(ConfigError, match=why):
            HeadConfig.from_dict(bad)


def test_the_logistic_sgd_loop_allocates_nothing_per_step():
    """Every buffer is made before the first step; a step only writes into them. tracemalloc sees
    NumPy's array allocations: the peak during a step stays near what was allocated before it."""
    import tracemalloc

    from edgemeta.runtime.heads import logistic_fit
    rng = np.random.default_rng(0)
    support, labels = rng.normal(size=(100, 512)).astype(np.float32), np.repeat(np.arange(20), 5)
    growth = []

    def on_step(step):
        current, peak = tracemalloc.get_traced_memory()
        growth.append(peak - on_step.start)
        tracemalloc.reset_peak()
        on_step.start = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    on_step.start = tracemalloc.get_traced_memory()[0]
    logistic_fit(support, labels, 20, steps=20, momentum=0.9, weight_decay=1e-3, on_step=on_step)
    tracemalloc.stop()
    # what is left is NumPy's own iterator buffers for broadcasting (about 9 kB); the loop before this
    # change allocated its logits, gradients and updates each step (82 kB here)
    assert len(growth) == 21 and max(growth[1:]) < 16_384, growth   # mark -1 (the set-up) holds the buffers


def test_every_registered_head_is_a_complete_kind():
    """A head is one registration: settings round-trip, fit gives the declared shapes, scores are
    finite, and its torch and frozen-graph flavours are in their tables (checked at import)."""
    from edgemeta.export import freeze
    rng = np.random.default_rng(0)
    s, y, q = rng.normal(size=(15, 8)).astype(np.float32), np.repeat(np.arange(5), 3), rng.normal(size=(4, 8)).astype(np.float32)
    assert set(th.TORCH_HEADS) == set(freeze.FROZEN_HEADS) == set(nh.head_names())
    for name in nh.head_names():
        head = HeadConfig(kind=name)
        assert HeadConfig.from_dict(head.to_dict()) == head
        fitted = nh.fit(head, s, y, 5)
        assert {k: v.shape for k, v in fitted.items()} == nh.fitted_shapes(head, 5, 8)
        assert np.isfinite(nh.score(head, fitted, q)).all()
        th.head_logits(head, torch.from_numpy(s), torch.from_numpy(y), torch.from_numpy(q), 5)
    with pytest.raises(ConfigError, match="unknown head 'svm'; choose one of prototype, ridge, logistic, mahalanobis"):
        HeadConfig(kind="svm")
    with pytest.raises(ValueError, match="registered twice"):
        nh.register_head(nh.HEAD_KINDS["ridge"])
    # a head registered without its other flavours fails where a flavour's table is checked
    with pytest.raises(ImportError, match=r"missing \['knn'\]"):
        _check_with_extra_head(nh, freeze.FROZEN_HEADS)


def _check_with_extra_head(nh, table):
    import dataclasses
    extra = dataclasses.replace(nh.HEAD_KINDS["prototype"], name="knn")
    nh.HEAD_KINDS["knn"] = extra
    try:
        nh.check_flavour("frozen-graph", table)
    finally:
        del nh.HEAD_KINDS["knn"]


def test_the_shared_covariance_head_uses_the_covariance():
    """Two classes that differ along a low-variance direction, with a high-variance nuisance one:
    euclidean prototypes confuse them, the shared covariance separates them."""
    rng = np.random.default_rng(0)
    n = 20
    nuisance = rng.normal(0, 5.0, (2 * n, 1))
    signal = np.concatenate([rng.normal(-0.5, 0.1, (n, 1)), rng.normal(0.5, 0.1, (n, 1))])
    s = np.hstack([nuisance, signal]).astype(np.float32)
    y = np.repeat([0, 1], n)
    q = np.hstack([rng.normal(0, 5.0, (200, 1)), np.concatenate([rng.normal(-0.5, 0.1, (100, 1)),
                                                                  rng.normal(0.5, 0.1, (100, 1))])]).astype(np.float32)
    truth = np.repeat([0, 1], 100)
    acc = {kind: (nh.head_logits(HeadConfig(kind=kind, shrinkage=0.05), s, y, q, 2).argmax(1) == truth).mean()
           for kind in ("prototype", "mahalanobis")}
    assert acc["mahalanobis"] > 0.95 and acc["prototype"] < 0.8, acc


def test_the_logistic_head_is_linear_in_memory_and_bounded_in_work():
    """A dense one-hot and a classes × shots buffer per step took 850 MB at 10,000 one-shot classes
    (3.2 GB at 20,000), and steps up to 10,000 let a small gallery run for hours. Memory is now
    classes + shots (the softmax in blocks), the result the same as the one-block path's (float64
    reference of the same steps), and work beyond MAX_LOGISTIC_WORK is refused naming it."""
    import tracemalloc

    from edgemeta.runtime import heads as device_heads
    from edgemeta.runtime.errors import ConfigError
    rng = np.random.default_rng(0)
    n, d = 10_000, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.arange(n)
    tracemalloc.start()
    w, b = device_heads.logistic_fit(x, y, n, steps=2, lr=0.1, momentum=0.9)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 80 << 20, peak       # a classes × shots float32 buffer alone is 400 MB
    w64, b64 = device_heads.logistic_fit(x[:300].astype(np.float64), y[:300] % 150, 150, steps=3, momentum=0.9)
    block = device_heads.LOGISTIC_BLOCK
    try:
        device_heads.LOGISTIC_BLOCK = 1000   # the blocked path on a small problem, against float64
        w32, b32 = device_heads.logistic_fit(x[:300], y[:300] % 150, 150, steps=3, momentum=0.9)
    finally:
        device_heads.LOGISTIC_BLOCK = block
    scale = np.abs(x[:300]).sum(0).max() * 0.1 * 3 / 300 + 1
    assert np.abs(w32 - w64).max() <= 3 * 300 * 2 ** -24 * scale * 10
    with pytest.raises(ConfigError, match="multiply-adds .* use the prototype or ridge head"):
        device_heads.logistic_fit(np.zeros((20_000, 512), np.float32), np.arange(20_000), 20_000, steps=10)
