"""Output options never write over the command's own inputs, nor over a file of another kind:
every case here destroyed a store or a bundle with exit status 0 before. Torch-free tiny bundle."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import FewShotClassifier
from PIL import Image


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def enrolled(device_bundle, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)).save(frames / f"{i}.png")
    clf = FewShotClassifier.load(device_bundle, store=tmp_path / "store")
    clf.enroll("a", [frames / "0.png"])
    clf.enroll("b", [frames / "1.png"])
    return device_bundle, tmp_path / "store", frames


@pytest.mark.parametrize("command", [
    lambda b, s, f: ["watch", b, "--store", s, "--source", f, "--jsonl", s / "enrollment.npz"],
    lambda b, s, f: ["watch", b, "--store", s, "--source", f, "--jsonl", b / "embed.onnx"],
    lambda b, s, f: ["watch", b, "--store", s, "--source", f, "--jsonl", f / "0.png"],
    lambda b, s, f: ["gallery", "export", "--store", s, "--out", s / "enrollment.npz"],
    lambda b, s, f: ["gallery", "export", "--store", s, "--out", b / "embed.onnx"],
    lambda b, s, f: ["bench", b, "--json", b / "manifest.json", "--repeat", "1"],
    lambda b, s, f: ["bench", b, "--plot", b / "plot.png", "--repeat", "1"],
])
def test_outputs_inside_the_commands_own_inputs_are_refused(enrolled, command):
    bundle, store, frames = enrolled
    before = tree(bundle.parent)
    r = run_cli(*command(bundle, store, frames))
    assert r.exit_code != 0 and any(why in r.output for why in ("own input", "will not be overwritten", "inside a bundle",
                                                                 "inside an enrollment store")), r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert tree(bundle.parent) == before


def test_outputs_never_replace_another_bundle_or_store_nor_a_json_or_png_edgemeta_did_not_write(enrolled, tmp_path):
    """`bench --json OTHER_BUNDLE/manifest.json` destroyed that bundle with exit 0 (any JSON object
    counted as "a json file edgemeta wrote"); `--plot` over a store's kept image corrupted the store.
    An output replaces only a file edgemeta wrote for that purpose."""
    import shutil
    bundle, store, frames = enrolled
    other = tmp_path / "other-bundle"
    shutil.copytree(bundle, other)
    kept = next((store / "images").iterdir())
    config = tmp_path / "settings.json"
    config.write_text('{"mine": true}\n')
    photo = tmp_path / "photo.png"
    Image.new("L", (4, 4)).save(photo)
    before = {**tree(other), **tree(store), "settings": config.read_bytes(), "photo": photo.read_bytes()}
    for args in (["bench", bundle, "--json", other / "manifest.json", "--repeat", "1"],
                 ["bench", bundle, "--plot", kept.with_suffix(".png") if kept.suffix != ".png" else kept, "--repeat", "1"],
                 ["bench", bundle, "--json", config, "--repeat", "1"],
                 ["bench", bundle, "--plot", photo, "--repeat", "1"],
                 ["watch", bundle, "--store", store, "--source", frames, "--jsonl", other / "notes.jsonl"]):
        r = run_cli(*args)
        assert r.exit_code == 2 and r.output.startswith("error:"), r.output
        assert "inside a bundle" in r.output or "inside an enrollment store" in r.output or "will not be overwritten" in r.output
    assert {**tree(other), **tree(store), "settings": config.read_bytes(), "photo": photo.read_bytes()} == before
    # what bench itself wrote is replaced (the plot where matplotlib, the [plot] extra, is installed)
    import importlib.util
    plot = ["--plot", tmp_path / "b.png"] if importlib.util.find_spec("matplotlib") else []
    for _ in range(2):
        r = run_cli("bench", bundle, "--json", tmp_path / "b.json", *plot, "--repeat", "1",
                    "--way", "2", "--shot", "1", "--steps", "1", "--batch", "1")
        assert r.exit_code == 0, r.output


def test_an_existing_file_of_another_kind_is_not_truncated(enrolled, tmp_path):
    bundle, store, frames = enrolled
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for args in (["gallery", "export", "--store", store, "--out", notes],
                 ["watch", bundle, "--store", store, "--source", frames, "--jsonl", notes],
                 ["bench", bundle, "--json", notes, "--repeat", "1"]):
        r = run_cli(*args)
        assert r.exit_code != 0 and "will not be overwritten" in r.output, r.output
    assert notes.read_text() == "my notes\n"
    r = run_cli("bench", bundle, "--plot", tmp_path / "x.onnx", "--repeat", "1")
    assert r.exit_code != 0 and "ending in .png" in r.output and "Traceback" not in r.output
    # its own kind is replaced as before
    assert run_cli("gallery", "export", "--store", store, "--out", tmp_path / "g.npz").exit_code == 0
    assert run_cli("gallery", "export", "--store", store, "--out", tmp_path / "g.npz").exit_code == 0
    out = tmp_path / "frames.jsonl"
    for _ in range(2):
        r = run_cli("watch", bundle, "--store", store, "--source", frames, "--jsonl", out)
        assert r.exit_code == 0, r.output
    assert len(out.read_text().splitlines()) == 3


def test_freeze_never_replaces_its_own_bundle_or_store(enrolled, tmp_path):
    pytest.importorskip("onnx")
    bundle, store, _ = enrolled
    before = tree(bundle.parent)
    for out in (bundle, store, bundle / "frozen"):
        r = run_cli("freeze", bundle, "--store", store, "--out", out, "--overwrite")
        assert r.exit_code != 0 and "contains the source" in r.output, r.output
    assert tree(bundle.parent) == before
    r = run_cli("freeze", bundle, "--store", tmp_path / "missing", "--out", tmp_path / "f")
    assert r.exit_code != 0 and "no store at" in r.output


def test_a_full_disk_names_the_file_and_leaves_no_empty_output(enrolled, tmp_path, monkeypatch):
    """Disk full in `gallery export` and `bench --json/--plot` named no file, and bench left a
    0-byte output. Outputs are written whole or not at all, and the error names the file."""
    import errno
    import os

    import edgemeta.runtime.files as files
    bundle, store, _ = enrolled

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", full)
    for args, out in ((["gallery", "export", "--store", store, "--out", tmp_path / "g.npz"], tmp_path / "g.npz"),
                      (["bench", bundle, "--json", tmp_path / "b.json", "--repeat", "1", "--way", "2", "--shot", "1",
                        "--steps", "1", "--batch", "1"], tmp_path / "b.json")):
        r = run_cli(*args)
        assert r.exit_code == 2 and "No space left on device" in r.output and str(out) in " ".join(r.output.split()), r.output
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.*.tmp"))


def test_a_full_disk_while_freezing_names_the_bundle_and_leaves_nothing(enrolled, tmp_path, monkeypatch):
    """Disk full in `freeze` (and `export`, which builds the same way) named no file."""
    pytest.importorskip("onnx")
    import errno
    import os

    import onnx
    bundle, store, _ = enrolled

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(onnx, "save", full)
    r = run_cli("freeze", bundle, "--store", store, "--out", tmp_path / "frozen")
    assert r.exit_code == 2 and "No space left on device" in r.output and str(tmp_path / "frozen") in " ".join(r.output.split())
    assert not (tmp_path / "frozen").exists() and not list(tmp_path.glob(".frozen.building-*"))
