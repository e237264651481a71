"""The prepared GPU check (scripts/gpu_check_cuda.py) on this CPU machine: it runs from the source
tree on the folder scripts/gpu_check_workstation.sh makes, and every check either passes or says
why it was skipped (no CUDA device, no cuda-python, no CUDA provider) — nothing fails silently.
What the checks measure needs a GPU; this only proves the script is ready for the day one is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_cuda_check_runs_and_says_why_each_check_is_skipped(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    prepared = tmp_path / "gpu-check"
    subprocess.run(["bash", "scripts/gpu_check_workstation.sh", str(prepared)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    assert sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file()) < 64 << 20   # carried to the device
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_cuda.py"), str(prepared), str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert set(results["checks"]) == {"cuda_device_identity", "cuda_buffers_round_trip", "cuda_ep_fp32_embeddings",
                                      "cuda_ep_fp16_embeddings", "cuda_ep_frozen_classifier"}
    for name, c in results["checks"].items():
        assert c["ok"] or c.get("skipped"), (name, c)   # never an unexplained failure
