"""Correctness of the gradient-based meta-learners on models small enough to check by hand or by
finite differences (float64)."""
import pytest
import torch
import torch.nn.functional as F
from edgemeta.runtime import InputSpec
from torch.func import functional_call, vmap

from edgemeta.algorithms import ANIL, MAML, Reptile
from edgemeta.backbones import Embedder
from edgemeta.heads import logistic_fit, logistic_logits

N_WAY, SHOT, QUERY, TASKS = 3, 2, 2, 2


def _tiny_embedder():
    torch.manual_seed(0)
    e = Embedder("conv4", InputSpec(4, 4, "L", (0.5,), (0.25,)), {"hidden": 3, "depth": 1})
    return e.double()


def _tasks(seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(TASKS, N_WAY * SHOT, 1, 4, 4, generator=g, dtype=torch.float64) * 255
    qx = torch.rand(TASKS, N_WAY * QUERY, 1, 4, 4, generator=g, dtype=torch.float64) * 255
    sy = torch.arange(N_WAY).repeat_interleave(SHOT)
    qy = torch.arange(N_WAY).repeat_interleave(QUERY)
    return sx, sy, qx, qy


def _meta_loss(model, params, sx, sy, qx, qy):
    losses, _ = vmap(model.task_loss, in_dims=(None, 0, None, 0, None))(params, sx, sy, qx, qy)
    return losses.mean()


def _maml(first_order=False, vectorize=False):
    m = MAML(_tiny_embedder(), N_WAY, inner_steps=2, inner_lr=0.3, first_order=first_order, vectorize=vectorize).double()
    with torch.no_grad():  # a non-zero head so that every parameter's gradient is informative
        m.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return m


def test_second_order_maml_meta_gradient_equals_finite_differences():
    model = _maml()
    sx, sy, qx, qy = _tasks()
    model.meta_step(sx, sy, qx, qy)
    analytic = {k: p.grad.clone() for k, p in model.params().items()}
    base = {k: v.detach().clone() for k, v in model.params().items()}
    rng = torch.Generator().manual_seed(3)
    for _ in range(4):
        direction = {k: torch.randn(v.shape, generator=rng, dtype=v.dtype) for k, v in base.items()}
        eps = 1e-5
        plus = _meta_loss(model, {k: base[k] + eps * direction[k] for k in base}, sx, sy, qx, qy)
        minus = _meta_loss(model, {k: base[k] - eps * direction[k] for k in base}, sx, sy, qx, qy)
        numeric = float((plus - minus) / (2 * eps))
        predicted = float(sum((analytic[k] * direction[k]).sum() for k in base))
        assert numeric == pytest.approx(predicted, rel=1e-4, abs=1e-7)


def test_first_order_maml_differs_from_second_order_and_equals_the_adapted_query_gradient():
    sx, sy, qx, qy = _tasks()
    second, first = _maml(), _maml(first_order=True)
    second.meta_step(sx, sy, qx, qy)
    first.meta_step(sx, sy, qx, qy)
    g2 = torch.cat([p.grad.flatten() for p in second.params().values()])
    g1 = torch.cat([p.grad.flatten() for p in first.params().values()])
    assert (g1 - g2).norm() / g2.norm() > 1e-3  # second-order terms matter here
    # FOMAML: the query-loss gradient at the adapted parameters, averaged over tasks
    expected = None
    for t in range(TASKS):
        adapted = {k: v.detach().requires_grad_(True) for k, v in first.adapt(first.params(), sx[t], sy).items()}
        loss = F.cross_entropy(first.fmodel(adapted, qx[t]), qy) / TASKS
        grads = torch.autograd.grad(loss, list(adapted.values()))
        flat = torch.cat([g.flatten() for g in grads])
        expected = flat if expected is None else expected + flat
    torch.testing.assert_close(g1, expected, rtol=1e-8, atol=1e-10)


def test_anil_adapts_only_the_head_with_the_device_logistic_steps():
    model = ANIL(_tiny_embedder(), inner_steps=3, inner_lr=0.2).double()
    sx, sy, qx, qy = _tasks()
    before = {k: v.detach().clone() for k, v in model.embedder.named_parameters()}
    logits = model.logits_after_adaptation(sx[0], sy, qx[0])
    # the same as: frozen backbone → logistic_fit (edgemeta.heads, the NumPy twin's formula) → logits
    with torch.no_grad():
        z = model.embedder(torch.cat([sx[0], qx[0]]))
        w, b = logistic_fit(z[:len(sy)], sy, N_WAY, 3, 0.2)
        torch.testing.assert_close(logits, logistic_logits(z[len(sy):], w, b))
    model.meta_step(sx, sy, qx, qy)
    for k, v in model.embedder.named_parameters():
        assert torch.equal(v, before[k]), f"{k} changed in the inner loop"
        assert v.grad is not None and v.grad.abs().sum() > 0  # but the backbone is meta-learned through it
    assert model.head_config() == {"kind": "logistic", "steps": 3, "lr": 0.2, "momentum": 0.0,
                                   "weight_decay": 0.0, "init": "prototype"}


@pytest.mark.parametrize("vectorize", [False, True])
def test_reptile_update_equals_the_formula(vectorize):
    model = Reptile(_tiny_embedder(), N_WAY, inner_steps=3, inner_lr=0.1, epsilon=0.5, vectorize=vectorize).double()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    sx, sy, qx, qy = _tasks()
    phi = {k: v.detach().clone() for k, v in model.params().items()}
    thetas = []
    for t in range(TASKS):  # plain per-task SGD with autograd, no vmap
        theta = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
        for _ in range(3):
            loss = F.cross_entropy(functional_call(model, theta, (sx[t],)), sy)
            grads = torch.autograd.grad(loss, list(theta.values()))
            theta = {k: (v - 0.1 * g).detach().requires_grad_(True) for (k, v), g in zip(theta.items(), grads)}
        thetas.append(theta)
    model.meta_step(sx, sy, qx, qy)
    for k, p in model.params().items():
        expected = phi[k] + 0.5 * torch.stack([th[k] - phi[k] for th in thetas]).mean(0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)


def test_meta_sgd_learns_per_layer_inner_step_sizes():
    model = MAML(_tiny_embedder(), N_WAY, inner_steps=1, inner_lr=0.3, learn_inner_lr=True).double()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.meta_step(*_tasks())
    lrs = list(model.inner_log_lr.values())
    assert len(lrs) == len(model.params()) and all(p.requires_grad for p in lrs)
    assert sum(float(p.grad.abs()) for p in lrs) > 0


def test_gradient_checkpoints_export_with_recalibrated_batchnorm(tmp_path, omniglot_paths):
    from conftest import run_cli

    from edgemeta.checkpoint import load_checkpoint
    data = [x for p in omniglot_paths for x in ("--data", p)]
    out = tmp_path / "maml"
    r = run_cli("train", *data, "--split-mode", "seeded", "--algo", "fomaml", "--way", "5", "--shot", "1", "--query", "3",
                "--meta-batch", "2", "--inner-steps", "1", "--episodes", "3", "--val-every", "3", "--val-episodes", "5",
                "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(out / "best.safetensors")
    bn = ckpt.model_state["embedder.backbone.features.1.running_var"]
    assert bn.shape == (64,) and not torch.allclose(bn, torch.ones(64))  # recomputed, not the init
    e = run_cli("eval", out / "best.safetensors", *data, "--split-mode", "seeded", "--episodes", "10", "--json")
    assert e.exit_code == 0, e.output
    wrong_way = run_cli("eval", out / "best.safetensors", *data, "--split-mode", "seeded", "--way", "10")
    assert wrong_way.exit_code == 2 and "adapts a 5-way head" in wrong_way.output
    frozen = run_cli("eval", out / "best.safetensors", *data, "--split-mode", "seeded", "--episodes", "10",
                     "--head", "prototype", "--json")
    assert frozen.exit_code == 0
    exp = run_cli("export", out / "best.safetensors", "--out", tmp_path / "b", "--calib-data", omniglot_paths[0])
    assert exp.exit_code == 0, exp.output
    from edgemeta.runtime import load_bundle
    assert load_bundle(tmp_path / "b").head.kind == "logistic"


@pytest.mark.parametrize("make", [lambda v: _maml(first_order=True, vectorize=v),
                                  lambda v: ANIL(_tiny_embedder(), 3, 0.2, vectorize=v).double()], ids=["fomaml", "anil"])
def test_vectorised_meta_gradient_equals_a_per_task_loop(make):
    sx, sy, qx, qy = _tasks()
    vectorised, looped = make(True), make(False)
    vectorised.meta_step(sx, sy, qx, qy)
    params = dict(looped.embedder.named_parameters()) if isinstance(looped, ANIL) else looped.params()
    total = 0
    for t in range(TASKS):
        args = (params, sx[t], sy, qx[t], qy) + ((N_WAY,) if isinstance(looped, ANIL) else ())
        total = total + looped.task_loss(*args)[0] / TASKS
    total.backward()
    for (k, a), (_, b) in zip(vectorised.named_parameters(), looped.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=k)


@pytest.mark.parametrize("make", [
    lambda v: _maml(vectorize=v), lambda v: _maml(first_order=True, vectorize=v),
    lambda v: ANIL(_tiny_embedder(), 3, 0.2, vectorize=v).double(),
    lambda v: Reptile(_tiny_embedder(), N_WAY, inner_steps=3, inner_lr=0.1, epsilon=0.5, vectorize=v).double(),
], ids=["maml", "fomaml", "anil", "reptile"])
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorised"])
def test_channels_last_training_layout_gives_the_same_meta_update(make, vectorize):
    """The CPU default (NHWC activations) computes the same meta-update as NCHW, on every path,
    including under vmap (where the layout switch stands down)."""
    sx, sy, qx, qy = _tasks()
    updates = []
    for channels_last in (False, True):
        model = make(vectorize)
        model.embedder.channels_last = channels_last
        model.meta_step(sx, sy, qx, qy)
        assert model.embedder.channels_last == channels_last  # restored after vmap
        updates.append([p.grad if p.grad is not None else p.detach().clone() for p in model.parameters()])
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_second_order_support_pass_runs_nchw_and_the_query_pass_channels_last(first_order):
    """Second-order MAML runs its support pass in NCHW (faster double backward through BatchNorm),
    the query pass in the embedder's channels-last layout; first order keeps channels-last
    throughout. Same meta-gradient either way (test above)."""
    model = _maml(first_order=first_order)
    model.embedder.channels_last = True
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    sx, sy, qx, qy = _tasks()
    model.meta_step(sx[:1], sy, qx[:1], qy)
    # two inner steps on the support set, then the query
    assert seen == ([True, True, True] if first_order else [False, False, True])
    assert model.embedder.channels_last
