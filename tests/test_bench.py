import json

import pytest
from conftest import run_cli
from edgemeta.runtime.bench import validate_bench
from edgemeta.runtime.heads import HeadConfig
from PIL import Image


def test_bench_writes_a_valid_json_with_every_stage_and_a_png(tiny_bundle, tmp_path, omniglot_paths):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = run_cli("bench", tiny_bundle, "--images", omniglot_paths[0], "--shot", "1,5", "--steps", "1,10,20",
                "--batch", "1,4", "--repeat", "5", "--json", out, "--plot", png)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    validate_bench(result)
    assert [e["batch"] for e in result["embed"]] == [1, 4]
    assert all(e["p50_ms"] > 0 and e["p50_ms"] <= e["p99_ms"] and e["images_per_s"] > 0 for e in result["embed"])
    assert {(f["head"], f["shot"]) for f in result["head_fit"]} == {(h, s) for h in ("prototype", "ridge", "mahalanobis") for s in (1, 5)}
    assert [e["shot"] for e in result["enroll"]] == [1, 5] and [p["batch"] for p in result["predict"]] == [1, 4]
    assert result["peak_rss_mb"] > 10 and result["environment"]["cores"] >= 1
    assert "embed batch 4" in r.stdout and "per step" in r.stdout
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 800


def test_per_step_timings_count_the_steps_asked_for(monkeypatch):
    import numpy as np
    from edgemeta.runtime import heads
    from edgemeta.runtime.bench import bench_heads
    calls = []
    original = heads.logistic_fit

    def counting(*a, **kw):
        inner = kw["on_step"]
        kw["on_step"] = lambda i: (calls.append(i), inner(i))
        return original(*a, **kw)
    monkeypatch.setattr(heads, "logistic_fit", counting)
    feats = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    _, rows = bench_heads(feats, [5], [1], [1, 7], ["logistic"], repeat=6, logistic=HeadConfig(kind="logistic", lr=0.1))
    monkeypatch.undo()
    assert [r["steps"] for r in rows] == [1, 7]
    runs_1, runs_7 = max(3, 6 // 1), max(3, 6 // 1)
    assert calls.count(6) == runs_7 and calls.count(0) == runs_1 + runs_7  # every step of every run reported
    assert rows[1]["per_step"]["n"] == runs_7 * 7  # every step timed: the set-up (imprinting, buffers) is marked apart
    assert rows[0]["per_step"]["n"] == runs_1


@pytest.mark.parametrize("args,msg", [(["--shot", "0"], "positive integers"), (["--head", "svm"], "unknown head")])
def test_bench_bad_options(tiny_bundle, args, msg):
    r = run_cli("bench", tiny_bundle, *args)
    assert r.exit_code == 2 and msg in r.output


def test_a_single_batch_size_is_timed_once(device_bundle, tmp_path, omniglot_paths):
    out = tmp_path / "b.json"
    r = run_cli("bench", device_bundle, "--images", omniglot_paths[0], "--shot", "1", "--steps", "1",
                "--batch", "1", "--repeat", "3", "--json", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert [p["batch"] for p in result["predict"]] == [1] and r.stdout.count("predict batch 1") == 1
