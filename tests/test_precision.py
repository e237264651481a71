"""bf16 mixed-precision training (`--precision bf16`): on real Omniglot tasks the meta-gradient
points where the float32 one does, the weights and gradients stay float32, ANIL's inner loop (the
device's head) stays float32, and a training run through the CLI keeps float32 checkpoints."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edgemeta.runtime import InputSpec, pixels_to_batch
from edgemeta.runtime.progress import SILENT

from edgemeta.algorithms import ANIL, MAML
from edgemeta.backbones import Embedder
from edgemeta.data import EpisodeSampler
from edgemeta.data.episodes import stack_tasks
from edgemeta.precision import autocast

SPEC = InputSpec(28, 28, "L", (0.92,), (0.24,))


def _model(algo: str):
    torch.manual_seed(0)
    embedder = Embedder("conv4", SPEC, channels_last=True)
    if algo == "anil":
        return ANIL(embedder, 2, 0.1)
    return MAML(embedder, 5, 1, 0.4, first_order=algo == "fomaml")


@pytest.mark.parametrize("algo", ["maml", "fomaml", "anil"])
def test_bf16_meta_gradient_points_where_the_fp32_one_does(algo, omniglot):
    episodes = EpisodeSampler(omniglot.labels, 5, 1, 5, seed=0).episodes(2)
    tasks = stack_tasks(episodes, lambda idx: torch.from_numpy(pixels_to_batch(omniglot.pixels[idx])))
    grads = {}
    for precision in ("fp32", "bf16"):
        model = _model(algo)
        with autocast(precision, "cpu"):
            loss, _ = model.meta_step(*tasks)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    a, b = grads["fp32"], grads["bf16"]
    cosine = float(F.cosine_similarity(a, b, dim=0))
    assert cosine > 0.98                          # measured 0.990–0.997 (maml/fomaml/anil)
    assert float((a - b).norm() / a.norm()) > 1e-4  # bf16 really ran: not the fp32 numbers


def test_anil_inner_loop_stays_float32_under_bf16_autocast():
    model = _model("anil")
    g = torch.Generator().manual_seed(0)
    s, q = torch.randn(5, 64, generator=g), torch.randn(15, 64, generator=g)
    sy = torch.arange(5)
    reference = model.head_logits(s, sy, q, 5)
    with autocast("bf16", "cpu"):
        under_autocast = model.head_logits(s, sy, q, 5)
        assert (s @ q.T).dtype == torch.bfloat16  # autocast is on for everything else
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


def test_cli_trains_second_order_maml_in_bf16_and_keeps_float32_checkpoints(tmp_path, omniglot_paths):
    from conftest import run_cli

    from edgemeta.checkpoint import load_checkpoint
    data = [x for p in omniglot_paths for x in ("--data", p)]
    out = tmp_path / "maml-bf16"
    r = run_cli("train", *data, "--split-mode", "seeded", "--algo", "maml", "--way", "5", "--shot", "1", "--query", "3",
                "--meta-batch", "2", "--inner-steps", "1", "--episodes", "4", "--val-every", "4", "--val-episodes", "5",
                "--precision", "bf16", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(out / "best.safetensors")
    assert ckpt.meta["train_config"]["precision"] == "bf16"
    floats = [v for v in ckpt.model_state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and np.isfinite(losses).all()
    e = run_cli("eval", out / "best.safetensors", *data, "--split-mode", "seeded", "--episodes", "10", "--json")
    assert e.exit_code == 0, e.output


def test_bf16_on_a_device_without_native_bf16_warns_and_still_trains(tmp_path, omniglot_paths, monkeypatch):
    import edgemeta.train as training
    from edgemeta.config import TrainConfig
    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    config = TrainConfig(data=[str(p) for p in omniglot_paths], split_mode="seeded", algo="protonet", way=5, shot=1,
                         query=2, episodes=2, val_every=2, val_episodes=5, precision="bf16", out=str(tmp_path / "r"))
    with pytest.warns(UserWarning, match="no native bfloat16 arithmetic; training works but runs slower"):
        result = training.train(config, progress=SILENT)
    assert result.best_checkpoint.is_file()
