"""Run by `make test` in a second environment: the wheel installed with no extras: no torch,
no onnx — what a Jetson has. Proves the runtime and the device CLI need nothing more."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BUNDLE = Path(os.environ.get("EDGEMETA_TEST_BUNDLE", ""))
DATA = Path(os.environ.get("EDGEMETA_TEST_DATA", ""))
BIN = Path(sys.executable).parent


def edgemeta(*args):
    return subprocess.run([str(BIN / "edgemeta"), *map(str, args)], capture_output=True, text=True)


def test_this_environment_has_no_torch_and_a_regular_install():
    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("onnx") is None
    import edgemeta.export
    import edgemeta.runtime

    import edgemeta
    assert "site-packages" in edgemeta.__file__  # the installed wheel, not the source tree
    assert "site-packages" in edgemeta.runtime.__file__ and "site-packages" in edgemeta.export.__file__
    assert BUNDLE.is_dir() and DATA.is_file(), "make test passes EDGEMETA_TEST_BUNDLE and EDGEMETA_TEST_DATA"


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    """5 Tagalog characters (an alphabet the shipped model never saw): 5 support + 15 query each."""
    root = tmp_path_factory.mktemp("photos")
    by = {}
    with zipfile.ZipFile(DATA) as z:
        for name in sorted(z.namelist()):
            if "/Tagalog/" in name and name.endswith(".png"):
                by.setdefault(name.split("/")[-2], []).append(z.read(name))
    queries = []
    for c in sorted(by)[:5]:
        (root / "support" / c).mkdir(parents=True)
        for i, img in enumerate(by[c][:5]):
            (root / "support" / c / f"{i}.png").write_bytes(img)
        for i, img in enumerate(by[c][5:]):
            q = root / f"{c}__{i}.png"
            q.write_bytes(img)
            queries.append(q)
    return root, queries


def test_device_cli_enroll_predict_forget_without_torch(drawings, tmp_path):
    root, queries = drawings
    store = tmp_path / "store"
    r = edgemeta("enroll", BUNDLE, "--store", store, "--from-folder", root / "support")
    assert r.returncode == 0, r.stderr
    r = edgemeta("predict", BUNDLE, "--store", store, "--json", *queries)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    accuracy = sum(Path(row["image"]).name.split("__")[0] == row["label"] for row in rows) / len(rows)
    assert accuracy > 0.85, accuracy  # the shipped model, 5-way 5-shot, unseen alphabet
    assert edgemeta("forget", BUNDLE, "character01", "--store", store).returncode == 0
    listed = json.loads(edgemeta("classes", "--store", store, "--json").stdout)
    assert len(listed["classes"]) == 4
    r = edgemeta("eval", "--bundle", BUNDLE, "--data", DATA, "--episodes", "100", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 80


def test_the_wheel_carries_the_device_commands_fast_path(tmp_path):
    """device_commands.json is package data: without it `edgemeta classes` would still work, through
    typer, and the start-up the fast path exists for would be lost without a sign."""
    from edgemeta.cli import fast
    assert fast.SPEC.is_file() and "site-packages" in str(fast.SPEC)
    code = ("import sys; sys.argv = ['edgemeta', 'classes', '--store', sys.argv[1], '--json']\n"
            "from edgemeta.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'click')), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], capture_output=True, text=True)
    assert done.stderr.splitlines()[-1] == "[]" and "no store at" in done.stderr


def test_training_commands_say_what_to_install(tmp_path):
    r = edgemeta("train", "--data", DATA)
    assert r.returncode == 2 and "(edgemeta's [train] extra)" in r.stderr and "'torch>=" in r.stderr and "Traceback" not in r.stderr


def test_serve_and_watch_say_what_to_install(tmp_path):
    """The service and live sources are extras: without them, one line with the install command."""
    r = edgemeta("serve", BUNDLE, "--store", tmp_path / "s")
    assert r.returncode == 2 and "(edgemeta's [serve] extra)" in r.stderr and "'fastapi>=" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()
    runtime = importlib.import_module("edgemeta.runtime")
    static = Path(runtime.__file__).parent / "serve" / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}  # the page ships in the wheel
    r = edgemeta("data", "list", "--root", tmp_path / "data")  # datasets need no training extra
    assert r.returncode == 0 and "omniglot:background" in r.stdout


def test_installed_from_the_wheel_under_the_jetpack_constraints():
    """docs/jetson.md's install: a wheel built on the workstation, numpy < 2 (JetPack's OpenCV)."""
    from importlib.metadata import distribution

    import numpy
    dist = distribution("edgemeta")
    assert (dist.read_text("WHEEL") or "").startswith("Wheel-Version")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    assert direct.get("url", "").endswith(".whl"), direct
    assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
