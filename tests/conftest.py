"""Shared fixtures: the shipped Omniglot slice, a tiny trained checkpoint, an isolated cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OMNIGLOT = [ROOT / "data" / "omniglot" / "images_background_small1.zip",
            ROOT / "data" / "omniglot" / "images_background_small2.zip"]
SHIPPED_CHECKPOINT = ROOT / "checkpoints" / "omniglot-conv4-protonet.safetensors"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["EDGEMETA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def omniglot_paths() -> list[Path]:
    return list(OMNIGLOT)


@pytest.fixture(scope="session")
def omniglot(omniglot_paths):
    from edgemeta.data import load_dataset
    return load_dataset(omniglot_paths, 28, "L")


def run_cli(*args: str):
    """Run the CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from edgemeta.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, omniglot_paths):
    """A real (short) ProtoNet training run through the CLI on the shipped data."""
    out = tmp_path_factory.mktemp("run")
    data = [x for p in omniglot_paths for x in ("--data", p)]
    result = run_cli("train", *data, "--split-mode", "seeded", "--way", "10", "--shot", "5", "--query", "5",
                     "--episodes", "30", "--val-every", "15", "--val-episodes", "50", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory, omniglot_paths):
    """The tiny run exported with INT8 and FP16 variants, through the CLI."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    calib = [x for p in omniglot_paths for x in ("--calib-data", p)]
    result = run_cli("export", tiny_run / "best.safetensors", "--out", out, "--int8", "--fp16", *calib,
                     "--calib-images", "128")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory, omniglot_paths):
    """The shipped Omniglot checkpoint exported (fp32, parity-checked on real drawings), through the CLI."""
    out = tmp_path_factory.mktemp("shipped") / "bundle"
    r = run_cli("export", SHIPPED_CHECKPOINT, "--out", out, "--calib-data", omniglot_paths[1])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tagalog(omniglot_paths):
    """Real drawings of an alphabet never used in training: {character: [png bytes × 20]}."""
    import zipfile
    by: dict[str, list[bytes]] = {}
    with zipfile.ZipFile(omniglot_paths[1]) as z:
        for name in sorted(z.namelist()):
            if "/Tagalog/" in name and name.endswith(".png"):
                by.setdefault(name.split("/")[-2], []).append(z.read(name))
    return by


SLOW_FIXTURES = {"tiny_run", "tiny_bundle", "shipped_bundle"}  # a real training run and the exports
# modules that train or export real models throughout (the shipped EfficientNet-Lite checkpoints'
# exports alone took 240 of test-fast's 430 s) or run several processes
SLOW_MODULES = {"test_distributed", "test_rgb_pretrain", "test_gpu_check"}


def pytest_collection_modifyitems(config, items):
    """`slow`: tests that train or export a real model (through the fixtures above) or start
    processes; `make test-fast` leaves them out for the edit loop, `make test` runs everything."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


TINY_BUNDLE = ROOT / "tests" / "tiny_bundle"


@pytest.fixture
def device_bundle(tmp_path) -> Path:
    """A copy of the checked-in torch-free tiny bundle (tests/make_tiny_bundle.py): 16×16 greyscale → 16-d."""
    import shutil
    return Path(shutil.copytree(TINY_BUNDLE, tmp_path / "tiny-bundle"))


@pytest.fixture
def other_device_bundle(tmp_path) -> Path:
    """The tiny bundle with other weights: another model (another sha256)."""
    pytest.importorskip("onnx", reason="writing a second model needs onnx (the training extra); the device "
                                       "environment has none by design")
    from make_tiny_bundle import write_tiny_bundle
    return write_tiny_bundle(tmp_path / "other-bundle", seed=1)
