"""Regression tests for the hostile-input probe (docs/reliability.md): nothing of the user's is
ever deleted, poison (NaN, bombs, crafted manifests and stores) is refused, and every user mistake
or environment fault ends in one `error:` line, exit status 2, with nothing changed on disk."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.errors import BundleError, ConfigError, ImageDecodeError, StoreError
from edgemeta.runtime.preprocess import InputSpec, load_image
from edgemeta.runtime.store import EnrollmentStore, decode_state, encode_state
from PIL import Image


def one_error_line(result) -> str:
    """The CLI failed the way users are promised: exit 2, one `error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_pngs(folder, images: list[bytes]) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        paths.append(folder / f"photo{i}.png")
        paths[-1].write_bytes(data)
    return paths


# ------------------------------------------------------------------ 1. the store deletes only its own files
def test_the_store_never_deletes_files_it_did_not_write(tiny_bundle, tagalog, tmp_path):
    store = tmp_path / "store"
    chars = sorted(tagalog)
    # a user's photos already in the folder given as --store, and inside its images/ folder
    mine = write_pngs(store, tagalog[chars[0]][:2]) + write_pngs(store / "images", tagalog[chars[1]][:2])
    (store / "images" / "notes.txt").write_text("mine")
    clf = FewShotClassifier.load(tiny_bundle, store=store)
    clf.enroll("a", mine[:2])
    clf.enroll("b", mine[2:4])            # enrolled from inside STORE/images/
    clf.enroll("b", tagalog[chars[2]][:2], mode="replace")
    clf.forget("a")
    for p in mine:
        assert p.exists(), f"{p} was deleted"
    assert (store / "images" / "notes.txt").read_text() == "mine"
    # what the store kept for "a" and the old "b" is released and removed; "b"'s new shots stay
    kept = {n for c in clf._state.classes for n in c.images}
    ours = {p.name for p in (store / "images").iterdir()} - {p.name for p in mine} - {"notes.txt"}
    assert ours == kept and len(kept) == 2


def test_the_store_does_not_delete_through_a_linked_images_folder(tiny_bundle, tagalog, tmp_path):
    photos = tmp_path / "photos"
    mine = write_pngs(photos, tagalog[sorted(tagalog)[0]][:3])
    store = tmp_path / "store"
    store.mkdir()
    (store / "images").symlink_to(photos, target_is_directory=True)
    clf = FewShotClassifier.load(tiny_bundle, store=store, keep_images=False)
    clf.enroll("a", mine[:2])
    clf.forget("a")
    assert all(p.exists() for p in mine)
    with pytest.raises(StoreError, match="link to another folder"):  # nor are kept images written through it
        FewShotClassifier.load(tiny_bundle, store=store).enroll("b", mine[:2])
    assert sorted(photos.iterdir()) == sorted(mine)


def test_a_crashed_save_leaves_temp_files_that_the_next_writer_removes(tiny_bundle, tagalog, tmp_path):
    store = tmp_path / "store"
    clf = FewShotClassifier.load(tiny_bundle, store=store)
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    stale = [store / ".enrollment.npz.k3j_x9.tmp", store / "images" / (".%s.png.ab12cd.tmp" % ("0" * 32))]
    for p in stale:
        p.write_bytes(b"partial")
    user_file = store / ".enrollment.npz.mine.txt"
    user_file.write_text("not a temp file of ours")
    FewShotClassifier.load(tiny_bundle, store=store)  # the next open, even one that only predicts
    assert not any(p.exists() for p in stale) and user_file.exists()


# ------------------------------------------------------------------ 2. export --overwrite
def test_export_overwrites_only_a_bundle_and_a_failed_export_keeps_the_old_one(tiny_run, tiny_bundle, tmp_path, omniglot_paths):
    ckpt = tmp_path / "run" / "best.safetensors"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run / "best.safetensors", ckpt)
    # --out that contains the checkpoint being exported
    one_error_line(run_cli("export", ckpt, "--out", ckpt.parent, "--overwrite", "--calib-data", omniglot_paths[0]))
    assert ckpt.exists()
    # --out that is a file
    (tmp_path / "afile").write_text("x")
    assert "not a folder" in one_error_line(run_cli("export", ckpt, "--out", tmp_path / "afile", "--calib-data", omniglot_paths[0]))
    # a failing export (unreadable calibration data) over an existing bundle leaves it intact
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = tree(bundle)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    one_error_line(run_cli("export", ckpt, "--out", bundle, "--overwrite", "--calib-data", tmp_path / "bad.zip"))
    assert tree(bundle) == before
    # a successful --overwrite replaces the bundle, leaving no temp folder beside it
    ok = run_cli("export", ckpt, "--out", bundle, "--overwrite", "--calib-data", omniglot_paths[0])
    assert ok.exit_code == 0, ok.output
    assert set(tree(bundle)) == {"manifest.json", "embed.onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bad.zip", "bundle", "run"]


# ------------------------------------------------------------------ 3. NaN / inf
def test_nan_pixels_are_refused_and_json_is_always_valid(tiny_bundle, tagalog, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    clf.enroll("b", tagalog[sorted(tagalog)[1]][:2])
    before = tree(tmp_path / "s")
    for bad, why in ((np.full((2, 28, 28, 1), np.nan, np.float32), "NaN"),
                     (np.full((2, 28, 28, 1), np.inf, np.float64), "NaN or infinite"),
                     (np.full((2, 28, 28, 1), 300.0, np.float32), "0–255"),
                     (np.full((2, 28, 28, 1), -1, np.int16), "0–255"),
                     (np.zeros((2, 28, 28, 1), np.complex64), "dtype")):
        with pytest.raises(ImageDecodeError, match=why):
            clf.enroll("poison", bad)
        with pytest.raises(ImageDecodeError, match=why):
            clf.predict(bad)
    assert tree(tmp_path / "s") == before
    ok = clf.predict(np.full((1, 28, 28, 1), 255.0, np.float32))  # floats in range are pixels too
    assert np.isfinite(ok.probabilities).all()


def test_print_json_writes_null_for_non_finite_numbers(capsys):
    from edgemeta.cli import print_json
    print_json({"x": float("nan"), "y": [float("inf"), 1.5]})
    assert json.loads(capsys.readouterr().out) == {"x": None, "y": [None, 1.5]}


def test_a_store_holding_nan_is_refused_with_what_to_do(tiny_bundle, tagalog, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    state = EnrollmentStore(tmp_path / "s").read()
    from dataclasses import replace

    from edgemeta.runtime.store import EnrolledClass
    poisoned = replace(state, classes=(EnrolledClass("a", np.full_like(state.classes[0].embeddings, np.nan)),))
    with pytest.raises(StoreError, match="non-finite"):
        EnrollmentStore(tmp_path / "s").write(poisoned)
    with pytest.raises(StoreError, match="non-finite"):
        decode_state(encode_state(poisoned), "s")


def test_a_model_that_returns_nan_fails_predict_and_export(tiny_bundle, tagalog, tmp_path, monkeypatch):
    clf = FewShotClassifier.load(tiny_bundle)
    monkeypatch.setattr(clf.backend, "embed", lambda batch: np.full((len(batch), clf.bundle.embedding_dim), np.nan, np.float32))
    with pytest.raises(ImageDecodeError, match="non-finite embeddings"):
        clf.enroll("a", tagalog[sorted(tagalog)[0]][:1])


# ------------------------------------------------------------------ 4. export parity on a NaN model
def test_export_of_a_nan_model_fails_and_writes_nothing(tiny_run, tmp_path, omniglot_paths):
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "nan.safetensors"
    tensors = load_file(tiny_run / "best.safetensors")
    with open(tiny_run / "best.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)
    tensors[key][0, 0, 0, 0] = float("nan")
    save_file(tensors, ckpt, metadata=header["__metadata__"])
    line = one_error_line(run_cli("export", ckpt, "--out", tmp_path / "b", "--calib-data", omniglot_paths[0]))
    assert "non-finite" in line and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ 5, 6, 8. images
def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped():
    ramp = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83).astype(np.uint16)  # 0 … 65,000
    got = load_image(png_bytes(ramp), InputSpec(28, 28, "L"))[..., 0]
    want = np.rint(ramp / 257.0)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert 100 < got.mean() < 160  # clipping made nearly everything 255


def test_exif_orientation_is_applied():
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255                                       # white band at the top of the upright image
    stored = np.ascontiguousarray(np.rot90(tall, 1))      # a camera stores it turned by 90°
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90° clockwise to display"
    data = png_bytes(stored, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = load_image(data, InputSpec(40, 20, "RGB"))
    assert upright[:8].mean() > 200 and upright[12:].mean() < 40


def test_a_decompression_bomb_is_refused_before_decoding(monkeypatch):
    bomb = png_bytes(np.zeros((3000, 3000), np.uint8))    # 9 MP of zeros, a few kB on disk
    assert len(bomb) < 40_000
    monkeypatch.setenv("EDGEMETA_MAX_PIXELS", "4000000")
    with pytest.raises(ImageDecodeError, match="over the limit of 4,000,000"):
        load_image(bomb, InputSpec(28, 28, "L"))
    monkeypatch.setenv("EDGEMETA_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="EDGEMETA_MAX_PIXELS"):
        load_image(bomb, InputSpec(28, 28, "L"))


def test_large_jpegs_decode_in_draft_mode_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    photo = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((80, 80, 1))).astype(np.uint8)  # 2400×3200 blocks
    data = png_bytes(photo, format="JPEG", quality=90)
    spec = InputSpec(64, 64, "RGB")
    fast = load_image(data, spec)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS))
    assert np.abs(fast.astype(int) - full).mean() < 3.0


def test_fifos_folders_and_missing_files_are_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, why in ((fifo, "not a regular file"), (tmp_path, "not a regular file"), (tmp_path / "nope.png", "not found")):
        with pytest.raises(ImageDecodeError, match=why):
            load_image(path, InputSpec(28, 28, "L"))


# ------------------------------------------------------------------ 7. trusted sizes
def edited_bundle(tiny_bundle, tmp_path, edit) -> str:
    from edgemeta.runtime.bundle import read_manifest
    out = tmp_path / "edited"
    shutil.copytree(tiny_bundle, out)
    manifest = read_manifest(out)
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("edit, why", [
    (lambda m: m["input"].update(height=20000, width=20000), "image size"),
    (lambda m: m["input"].update(height=32, width=32), "manifest does not belong"),
    (lambda m: m["output"].update(dim=7), "embeddings of size 7"),
    (lambda m: m.update(head={"kind": "logistic", "steps": 10**9}), "steps"),
    (lambda m: m["head"].update(scale=float("inf")), "scale"),
])
def test_an_edited_manifest_is_refused_before_anything_is_allocated(tiny_bundle, tagalog, tmp_path, edit, why):
    bundle = edited_bundle(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=why):
        FewShotClassifier.load(bundle)
    one_error_line(run_cli("predict", bundle, tmp_path / "x.png", "--store", tmp_path))


def test_a_crafted_store_head_is_refused_not_run(tiny_bundle, tagalog, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    state = EnrollmentStore(tmp_path / "s").read()
    from dataclasses import replace
    class Crafted:  # what a hand-edited store file holds
        def to_dict(self):
            return {"kind": "logistic", "steps": 10**9, "lr": 0.1}
    crafted = replace(state, head=Crafted())
    (tmp_path / "s" / "enrollment.npz").write_bytes(encode_state(crafted))
    with pytest.raises(StoreError, match="steps"):
        FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    wrong_shots = replace(state, classes=(replace(state.classes[0], images=("../../etc/passwd",)),))
    (tmp_path / "s" / "enrollment.npz").write_bytes(encode_state(wrong_shots))
    with pytest.raises(StoreError, match="did not write"):
        FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")


# ------------------------------------------------------------------ every failure is one line
def test_labels_with_control_characters_or_too_long_are_refused(tiny_bundle, tagalog, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    shots = tagalog[sorted(tagalog)[0]][:1]
    for label in ("two\nlines", "nul\x00", "esc\x1b[31mred", "x" * 129, "unknown", "  "):
        with pytest.raises(StoreError):
            clf.enroll(label, shots)
    assert not (tmp_path / "s" / "enrollment.npz").exists()
    assert clf.enroll("  café ☕ [b]  ", shots) == 1 and clf.classes == ["café ☕ [b]"]


def test_from_folder_checks_every_class_before_saving_any(tiny_bundle, tagalog, tmp_path):
    chars = sorted(tagalog)
    write_pngs(tmp_path / "photos" / "a", tagalog[chars[0]][:2])
    write_pngs(tmp_path / "photos" / "b", tagalog[chars[1]][:2])
    (tmp_path / "photos" / "c").mkdir()
    (tmp_path / "photos" / "c" / "broken.png").write_bytes(b"not an image")
    line = one_error_line(run_cli("enroll", tiny_bundle, "--store", tmp_path / "s", "--from-folder", tmp_path / "photos"))
    assert "broken.png" in line
    assert not (tmp_path / "s" / "enrollment.npz").exists()


def test_forget_checks_every_label_and_never_creates_a_store(tiny_bundle, tagalog, tmp_path):
    assert "no store" in one_error_line(run_cli("forget", tiny_bundle, "a", "--store", tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    before = tree(tmp_path / "s")
    assert "nothing was removed" in one_error_line(run_cli("forget", tiny_bundle, "a", "zzz", "--store", tmp_path / "s"))
    assert tree(tmp_path / "s") == before


def test_a_string_is_one_image(tiny_bundle, tagalog, tmp_path):
    paths = write_pngs(tmp_path / "p", tagalog[sorted(tagalog)[0]][:3])
    clf = FewShotClassifier.load(tiny_bundle)
    clf.enroll("a", str(paths[0]))
    clf.enroll("b", tagalog[sorted(tagalog)[1]][:1])
    assert clf.predict(str(paths[1])).labels == ["a"]


def test_an_os_fault_while_saving_is_one_error_line_and_the_store_is_unchanged(tiny_bundle, tagalog, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "p", tagalog[sorted(tagalog)[0]][:2])
    ok = run_cli("enroll", tiny_bundle, *paths, "--store", tmp_path / "s", "--label", "a")
    assert ok.exit_code == 0, ok.output
    before = tree(tmp_path / "s")
    import edgemeta.runtime.store as store_module

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(store_module, "atomic_write", disk_full)
    line = one_error_line(run_cli("enroll", tiny_bundle, *paths, "--store", tmp_path / "s", "--label", "b"))
    assert "No space left on device" in line
    assert tree(tmp_path / "s") == before


@pytest.mark.parametrize("args, why", [
    (["eval", "--bundle", "{bundle}", "--data", "{data}", "--way", "1"], "'--way': 1 is not in the range x>=2"),
    (["eval", "--bundle", "{bundle}", "--data", "{data}", "--episodes", "0"], "'--episodes': 0 is not in the range x>=1"),
    (["eval", "--bundle", "{bundle}", "--data", "{data}", "--query", "0"], "'--query': 0 is not in the range x>=1"),
    (["train", "--data", "{data}", "--way", "1", "--out", "{tmp}/run"], "way must be a whole number ≥ 2"),
    (["train", "--data", "{data}", "--lr", "nan", "--out", "{tmp}/run"], "lr must be a finite number"),
    (["train", "--data", "{data}", "--lr", "-1", "--out", "{tmp}/run"], "lr must be a finite number"),
    (["train", "--data", "{tmp}/nope.zip", "--out", "{tmp}/run"], "data path not found"),
    (["export", "{tmp}/fixed.onnx", "--out", "{tmp}/b", "--calib-images", "0"], "--calib-images must be ≥ 1"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--unknown", "nan"], "finite distance"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--top-k", "0"], "'--top-k': 0 is not in the range x>=1"),
    (["bench", "{bundle}", "--repeat", "0"], "'--repeat': 0 is not in the range x>=1"),
    (["bench", "{bundle}", "--json", "{tmp}/missing/out.json"], "does not exist"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--variant", "int4"], "'int4' is not one of 'fp32', 'fp16', 'int8', 'auto'"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--head", "knn"], "'knn' is not one of 'prototype', 'ridge'"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--backend", "tflite"], "backend must be auto or one of"),
    (["predict", "{bundle}", "{data}", "--store", "{tmp}", "--no-such-option"], "No such option '--no-such-option'"),
    (["export", "{onnx}", "--onnx", "--input-size", "28", "--mean", "half", "--out", "{tmp}/b"], "comma-separated numbers"),
    (["export", "{onnx}", "--onnx", "--input-size", "28", "--out", "{tmp}/b"], "batch size is fixed"),
])
def test_bad_options_are_one_error_line(tiny_bundle, omniglot_paths, tmp_path, args, why):
    import onnx
    fixed = onnx.load(str(tiny_bundle / "embed.onnx"))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    values = {"bundle": tiny_bundle, "data": omniglot_paths[0], "tmp": tmp_path, "onnx": tmp_path / "fixed.onnx"}
    line = one_error_line(run_cli(*[a.format(**values) for a in args]))
    assert why in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "b").exists()


def test_implausible_checkpoint_metadata_is_one_error_line(tiny_run, tmp_path, omniglot_paths):
    from safetensors.torch import load_file, save_file
    tensors = load_file(tiny_run / "best.safetensors")
    with open(tiny_run / "best.safetensors", "rb") as f:
        meta = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]["edgemeta"])
    for edit, why in ((lambda m: m["input"].update(height=10**6), "image size"),
                      (lambda m: m["backbone"].update(name="os.system"), "unknown backbone"),
                      (lambda m: m.update(embedding_dim=-3), "embedding_dim")):
        bad = json.loads(json.dumps(meta))
        edit(bad)
        save_file(tensors, tmp_path / "bad.safetensors", metadata={"edgemeta": json.dumps(bad)})
        line = one_error_line(run_cli("export", tmp_path / "bad.safetensors", "--out", tmp_path / "b",
                                      "--calib-data", omniglot_paths[0]))
        assert why in line and not (tmp_path / "b").exists()


def test_a_rotated_phone_jpeg_enrolls_like_the_upright_one(tiny_bundle, tagalog):
    upright = np.asarray(Image.open(io.BytesIO(tagalog[sorted(tagalog)[0]][0])).convert("RGB").resize((120, 160)))
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned; "rotate 270° clockwise to display"
    stored = png_bytes(np.ascontiguousarray(np.rot90(upright, -1)), format="JPEG", exif=exif.tobytes(), quality=95)
    plain = png_bytes(upright, format="JPEG", quality=95)
    clf = FewShotClassifier.load(tiny_bundle)
    a, b = clf.embed([stored, plain])
    assert np.linalg.norm(a - b) < 0.1 * np.linalg.norm(b)


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_exotic_image_modes_decode_to_the_model_input(mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    image = {"CMYK": rgb.convert("CMYK"), "P": rgb.convert("P"), "RGBA": rgb.convert("RGBA"), "LA": rgb.convert("LA"),
             "I;16": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "1": rgb.convert("1")}[mode]
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    for spec in (InputSpec(28, 28, "L"), InputSpec(32, 32, "RGB")):
        pixels = load_image(buf.getvalue(), spec)
        assert pixels.dtype == np.uint8 and pixels.shape == (spec.height, spec.width, spec.channels)
        assert 30 < pixels.mean() < 225  # not blank: decoded, converted, scaled


def ico_around_png(png: bytes, claimed: int = 256) -> bytes:
    """An .ico whose one entry claims claimed×claimed and points at `png` (the reproduction's shape)."""
    import struct
    side = 0 if claimed == 256 else claimed
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), 22) + png


def test_an_icon_pointing_at_a_huge_png_is_refused_before_any_pixel_is_decoded():
    from edgemeta.runtime.preprocess import DecodeBudget
    """Pillow's ICO plugin decodes an embedded PNG inside Image.open to learn its size, outside the
    pixel limit and the decode budget: 8 such requests held 2.9 GB. Only formats whose open reads a
    header are opened at all (JPEG, PNG, BMP, GIF, WebP); ICO, ICNS, TIFF and JPEG 2000 are refused
    before any plugin runs."""
    import time
    import tracemalloc
    big = io.BytesIO()
    Image.new("1", (9400, 9400)).save(big, "PNG")
    icon = ico_around_png(big.getvalue())
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="not a JPEG, PNG, BMP, GIF or WebP image"):
        load_image(icon, InputSpec(28, 28, "L"), DecodeBudget(1_000_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < 8 << 20   # decoding it would take 88 MB (9400² at 1 byte)
    for fmt in ("TIFF", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt)
        with pytest.raises(ImageDecodeError, match="not a JPEG, PNG"):
            load_image(buf.getvalue(), InputSpec(28, 28, "L"))


def test_the_decode_budget_counts_bytes_per_pixel_not_pixels():
    """A 16-bit PNG costs more while it decodes than an 8-bit one of the same size: the budget holds
    more for it, so the same budget admits fewer of them at once."""
    from edgemeta.runtime.preprocess import decode_cost, peek_image
    grey8 = png_bytes(np.zeros((100, 100), np.uint8))
    grey16 = png_bytes(np.zeros((100, 100), np.uint16))
    rgb = png_bytes(np.zeros((100, 100, 3), np.uint8))
    costs = [decode_cost(peek_image(b)) for b in (grey8, rgb, grey16)]
    assert costs[0] < costs[1] < costs[2] and costs[1] == 100 * 100
