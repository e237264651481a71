"""Start-up of the device CLI as a user meets it: wall time of whole commands (median of N runs,
interleaved), against the bare imports every device command needs (numpy + onnxruntime + Pillow).
On the checked-in tiny bundle, so the model's own cost is negligible and the figure is start-up.
--before PYTHON runs the same commands, interleaved, with another installation of edgemeta (an
earlier commit installed in its own venv) for a side-by-side before/after. --bundle B adds `predict
--json` on a real bundle (B's fp32 graph, one RGB photo enrolled): with the optimised graph ONNX
Runtime saved on the first run (ort-graphs in the cache), and with no cache to read or write.
"bare imports, no teardown" ends the bare imports with os._exit, as a finished device command ends
(edgemeta.cli.fast.exit_without_teardown): the floor for a command that skips the teardown too.

    python benchmarks/cli_startup.py [--runs 7] [--before /tmp/venv-before/bin/python] [--bundle B]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ALL = "import sys; from edgemeta.cli import register; sys.argv[0] = 'edgemeta'; register()()"
NOW = "import sys; from edgemeta.cli import main; sys.argv[0] = 'edgemeta'; main()"


def wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)  # not the source tree
    if done.returncode:
        raise SystemExit(f"{cmd[2:]} failed: {done.stderr.strip()[-400:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--before", help="the python of another edgemeta installation, run side by side")
    ap.add_argument("--bundle", help="also time predict --json on this bundle, with and without the ort-graphs cache")
    args = ap.parse_args()
    # as a pip install leaves edgemeta: compiled to bytecode (an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module from source at each start)
    import compileall

    import edgemeta.runtime

    import edgemeta
    for package in {Path(edgemeta.__file__).parent, Path(edgemeta.runtime.__file__).parent}:
        compileall.compile_dir(str(package), quiet=1)
    tmp = Path(tempfile.mkdtemp())
    img = tmp / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(img)
    bundle, store = ROOT / "tests" / "tiny_bundle", tmp / "store"
    py = sys.executable
    subprocess.run([py, "-c", NOW, "enroll", str(bundle), str(img), "--store", str(store), "--label", "a"], check=True,
                   capture_output=True)
    cases = {
        "bare imports": [py, "-c", "import numpy, onnxruntime, PIL.Image"],
        # the same, ending without the interpreter's teardown, as a finished device command does
        "bare imports, no teardown": [py, "-c", "import os, numpy, onnxruntime, PIL.Image; os._exit(0)"],
        "predict (device modules)": [py, "-c", NOW, "predict", str(bundle), "--store", str(store), str(img)],
        "predict --json": [py, "-c", NOW, "predict", str(bundle), "--store", str(store), "--json", str(img)],
        "predict (every module)": [py, "-c", ALL, "predict", str(bundle), "--store", str(store), str(img)],
        "classes (device modules)": [py, "-c", NOW, "classes", "--store", str(store)],
        "classes (every module)": [py, "-c", ALL, "classes", "--store", str(store)],
        "enroll (device modules)": [py, "-c", NOW, "enroll", str(bundle), str(img), "--store", str(store), "--label", "b",
                                    "--replace"],
        "enroll (every module)": [py, "-c", ALL, "enroll", str(bundle), str(img), "--store", str(store), "--label", "b",
                                  "--replace"],
    }
    if args.before:
        for name in ("predict (device modules)", "predict --json", "classes (device modules)", "enroll (device modules)"):
            cmd = list(cases[name])
            cases[f"{name.split(' (')[0]} (before)"] = [args.before, *cmd[1:]]
    envs: dict[str, dict] = {}
    if args.bundle:
        photo, real_store = tmp / "photo.png", tmp / "real-store"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(photo)
        subprocess.run([py, "-c", NOW, "enroll", args.bundle, str(photo), "--store", str(real_store), "--label", "a"],
                       check=True, capture_output=True)
        real = [py, "-c", NOW, "predict", args.bundle, "--store", str(real_store), "--json", str(photo)]
        (tmp / "not-a-folder").write_text("")
        cases["bundle: predict --json, graph cache"] = real
        cases["bundle: predict --json, no cache"] = real
        envs["bundle: predict --json, no cache"] = {**os.environ, "EDGEMETA_CACHE": str(tmp / "not-a-folder" / "cache")}
        if args.before:
            cases["bundle: predict --json (before)"] = [args.before, *real[1:]]
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():
            times[name].append(wall(cmd, envs.get(name)))
    bare, bare_min = statistics.median(times["bare imports"]), min(times["bare imports"])
    print(f"machine: {machine()}; median (and fastest) of {args.runs} interleaved runs")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:26s} {m * 1e3:7.1f} ms  ({m / bare:.2f}× the bare imports; fastest {min(ts) * 1e3:6.1f} ms, "
              f"{min(ts) / bare_min:.2f}×)")


if __name__ == "__main__":
    main()
