"""`edgemeta train` with glibc's default allocator against the same command keeping its freed memory
(edgemeta.runtime.malloc, what `edgemeta train` does), each in a fresh process, runs interleaved: seconds
per training step (from metrics.jsonl, after the first logged window) and minor page faults of the
whole command, for the shipped Omniglot ProtoNet recipe (30-way 5-shot 5-query) and FOMAML
(5-way 1-shot 15-query, meta-batch 4).

    python benchmarks/memory_speed.py [--data omniglot/images_background.zip (under EDGEMETA_DATA)] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, machine

# Runs the CLI, with retain_freed_memory disabled when the first argument is "default".
_LAUNCH = """
import sys
import edgemeta.train
if sys.argv[1] == "default":
    edgemeta.train.retain_freed_memory = lambda: False
sys.argv = ["edgemeta"] + sys.argv[2:]
from edgemeta.cli import main
main()
"""

RECIPES = {
    "protonet 30w5s5q": ["--algo", "protonet", "--way", "30", "--shot", "5", "--query", "5", "--rotations"],
    "fomaml 5w1s15q mb4": ["--algo", "fomaml", "--way", "5", "--shot", "1", "--query", "15", "--meta-batch", "4",
                           "--inner-steps", "1", "--inner-lr", "0.4"],
}


def run(allocator: str, recipe: list[str], data: str, episodes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.toml"
        config.write_text(f"episodes = {episodes}\nlog_every = {episodes // 3}\nval_every = {episodes}\nval_episodes = 20\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", _LAUNCH, allocator, "train", "--config", str(config), "--data", data,
                        "--split-mode", "alphabets", *recipe, "--quiet", "--out", f"{tmp}/run"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        logs = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")]
    timed = [r for r in logs if "loss" in r]
    per_step = (timed[-1]["seconds"] - timed[0]["seconds"]) / (timed[-1]["episode"] - timed[0]["episode"])
    return {"step": per_step, "wall": wall, "faults": resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="omniglot/images_background.zip")
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"machine: {machine()}; `edgemeta train`, {args.episodes} meta-updates, fresh process per run, "
          f"{args.rounds} interleaved rounds, median")
    print(f"{'recipe':>20} | {'allocator':>9} | {'s/step':>7} | {'command s':>9} | {'minor faults':>12} | step speed-up")
    for label, recipe in RECIPES.items():
        results = {"default": [], "retained": []}
        for _ in range(args.rounds):
            for allocator in results:
                results[allocator].append(run(allocator, recipe, args.data, args.episodes))
        med = {a: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for a, rs in results.items()}
        for allocator, m in med.items():
            speedup = med["default"]["step"] / m["step"]
            print(f"{label:>20} | {allocator:>9} | {m['step']:>7.3f} | {m['wall']:>9.1f} | {m['faults']:>12.0f} | "
                  f"{speedup:>12.2f}×")


if __name__ == "__main__":
    main()
