"""Natural-image path: colour, augmentation (training only), pre-training, split files, --init."""
import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from edgemeta.runtime import DataError, InputSpec, load_image
from PIL import Image

from edgemeta.augment import augment_batch
from edgemeta.data import select_split


def test_colour_conversions_match_pil():
    rgb = Image.new("RGB", (8, 8), (200, 100, 50))
    assert load_image(rgb, InputSpec(8, 8, "RGB"))[0, 0].tolist() == [200, 100, 50]
    assert load_image(rgb, InputSpec(8, 8, "L"))[0, 0].tolist() == [round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)]
    grey = Image.new("L", (8, 8), 77)
    assert load_image(grey, InputSpec(8, 8, "RGB"))[0, 0].tolist() == [77, 77, 77]
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent → white, not black
    assert load_image(rgba, InputSpec(8, 8, "RGB"))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (8, 8), 3)
    assert load_image(palette, InputSpec(4, 4, "RGB")).shape == (4, 4, 3)


def test_augmentation_is_seeded_keeps_shape_and_range_and_changes_images():
    x = torch.rand(6, 3, 16, 16) * 255
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    c = augment_batch(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    assert not torch.allclose(a, x)
    same = augment_batch(x, torch.Generator().manual_seed(1), pad=0, flip=False, jitter=0)
    assert torch.equal(same, x)


def test_the_random_crops_padding_is_a_setting_scaled_to_the_training_size(omniglot_paths, tmp_path, monkeypatch):
    """--augment-pad reaches the crop (4 px is CIFAR's at 32 px; an upsampled image wants it scaled),
    and a padding as large as the image is one error line before any data loads."""
    import edgemeta.train
    pads = []

    def recording(x, generator, pad=4, **kw):
        pads.append(pad)
        return augment_batch(x, generator, pad=pad, **kw)
    monkeypatch.setattr(edgemeta.train, "augment_batch", recording)
    data = [x for p in omniglot_paths for x in ("--data", p)]
    common = [*data, "--split-mode", "seeded", "--way", "5", "--shot", "1", "--query", "2", "--val-every", "2",
              "--val-episodes", "2", "--quiet", "--augment"]
    r = run_cli("train", *common, "--episodes", "2", "--augment-pad", "7", "--out", tmp_path / "r")
    assert r.exit_code == 0, r.output
    assert pads and set(pads) == {7}
    bad = run_cli("train", *common, "--episodes", "2", "--augment-pad", "28", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "augment_pad must be smaller than image_size (28)" in bad.output
    assert not (tmp_path / "bad").exists()


def test_augmentation_never_runs_at_evaluation_export_or_enrollment(tiny_run, omniglot_paths, tmp_path, monkeypatch):
    import edgemeta.augment
    import edgemeta.train

    def forbidden(*a, **k):
        raise AssertionError("augmentation ran outside training")
    monkeypatch.setattr(edgemeta.augment, "augment_batch", forbidden)
    monkeypatch.setattr(edgemeta.train, "augment_batch", forbidden)
    data = [x for p in omniglot_paths for x in ("--data", p)]
    assert run_cli("eval", tiny_run / "best.safetensors", *data, "--split-mode", "seeded", "--episodes", "5").exit_code == 0
    assert run_cli("export", tiny_run / "best.safetensors", "--out", tmp_path / "b", "--calib-data", omniglot_paths[0]).exit_code == 0
    img = tmp_path / "x.png"
    Image.new("L", (30, 30), 128).save(img)
    assert run_cli("enroll", tmp_path / "b", "--store", tmp_path / "s", "--label", "a", img).exit_code == 0


def test_split_file_names_the_groups_of_each_split(tmp_path, omniglot):
    groups = sorted(set(omniglot.groups))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": groups[:5], "val": groups[5:6], "test": groups[6:]}))
    test = select_split(omniglot, "test", split_file=str(split))
    assert set(test.groups) == set(groups[6:])
    split.write_text(json.dumps({"train": groups}))
    with pytest.raises(DataError, match="must hold lists"):
        select_split(omniglot, "test", split_file=str(split))


def test_shipped_tiny_imagenet_split_is_disjoint_100_30_30():
    from conftest import ROOT
    parts = json.loads((ROOT / "data/splits/tiny-imagenet-fs.json").read_text())
    sets = [set(parts[k]) for k in ("train", "val", "test")]
    assert [len(s) for s in sets] == [100, 30, 30] and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_pretrain_then_episodic_finetune_from_init(tmp_path, omniglot_paths):
    from edgemeta.checkpoint import load_checkpoint
    data = [x for p in omniglot_paths for x in ("--data", p)]
    pre = tmp_path / "pre"
    r = run_cli("train", *data, "--split-mode", "seeded", "--algo", "pretrain", "--colour", "RGB", "--batch-size", "64",
                "--episodes", "40", "--lr", "0.003", "--val-every", "20", "--val-episodes", "50", "--augment",
                "--out", pre, "--quiet")
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(pre / "best.safetensors")
    assert not any(k.startswith("classifier.") for k in ckpt.model_state)  # thrown away
    assert ckpt.meta["head"] == {"kind": "prototype", "metric": "cosine", "scale": 10.0}
    assert len(ckpt.spec.mean) == 3 and ckpt.meta["train_config"]["augment"] is True
    assert ckpt.meta["metrics"]["best_val_accuracy"] > 40  # 5-way 1-shot, chance 20
    last = load_checkpoint(pre / "last.safetensors")
    assert any(k.startswith("classifier.") for k in last.model_state)  # kept for --resume
    fine = tmp_path / "fine"
    r = run_cli("train", *data, "--split-mode", "seeded", "--algo", "protonet", "--metric", "cosine", "--colour", "RGB",
                "--init", pre / "best.safetensors", "--episodes", "1", "--lr", "1e-9", "--val-every", "1",
                "--val-episodes", "5", "--way", "5", "--out", fine, "--quiet")
    assert r.exit_code == 0, r.output
    tuned = load_checkpoint(fine / "last.safetensors")
    w = "embedder.backbone.features.0.weight"
    torch.testing.assert_close(tuned.model_state[w], ckpt.model_state[w], rtol=0, atol=1e-6)
    # mean/std computed on the training classes travel into the bundle's manifest
    out = run_cli("export", pre / "best.safetensors", "--out", tmp_path / "b", "--calib-data", omniglot_paths[0])
    assert out.exit_code == 0, out.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input"]["mean"] == list(ckpt.spec.mean) and manifest["input"]["colour"] == "RGB"
    bad = run_cli("train", *data, "--split-mode", "seeded", "--backbone", "edgenet", "--init", pre / "best.safetensors",
                  "--out", tmp_path / "x", "--quiet")
    assert bad.exit_code == 2 and "holds a conv4 backbone" in bad.output


RECORDS_CL2N = {"tinyimagenet-efficientnet-lite0-finetune", "tinyimagenet-efficientnet-lite2-finetune"}  # shipped with `ship_checkpoint --center`


@pytest.mark.parametrize("name,dim,side,extra", [("tinyimagenet-conv4-pretrain", 1024, 64, []),
                                                 ("tinyimagenet-conv4-finetune", 1024, 64, []),
                                                 ("tinyimagenet-edgenet-pretrain", 128, 64, []),
                                                 ("tinyimagenet-edgenet-distill", 128, 64, ["--center"]),
                                                 ("cifarfs-resnet12-pretrain", 256, 32, ["--center", "--flip-shots"]),
                                                 ("cifarfs-edgenet-pretrain", 128, 32, ["--center"]),
                                                 ("cifarfs-edgenet-distill", 128, 32, ["--center"]),
                                                 ("cifarfs-edgenet-rotation-distill", 128, 32, ["--center"]),
                                                 ("cifarfs-efficientnet-lite0-metafinetune", 1280, 160, ["--center"]),
                                                 ("cifarfs-efficientnet-lite0-finetune", 1280, 160, []),
                                                 ("cifarfs-efficientnet-lite0-finetune-trainval", 1280, 160, []),
                                                 ("cifarfs-efficientnet-lite2-finetune", 1280, 160, []),
                                                 ("cifarfs-efficientnet-lite2-finetune-trainval", 1280, 160, []),
                                                 ("cifarfs-efficientnet-lite2-224-finetune-trainval", 1280, 224, []),
                                                 ("tinyimagenet-efficientnet-lite0-metafinetune", 1280, 160, []),
                                                 ("tinyimagenet-efficientnet-lite0-finetune", 1280, 160, []),
                                                 ("tinyimagenet-efficientnet-lite2-finetune", 1280, 160, [])])
def test_shipped_rgb_checkpoint_exports_and_runs_through_the_runtime(tmp_path, omniglot_paths, name, dim, side, extra):
    from conftest import ROOT
    from edgemeta.runtime import FewShotClassifier, load_bundle
    ckpt = ROOT / "checkpoints" / f"{name}.safetensors"
    r = run_cli("export", ckpt, "--out", tmp_path / "b", "--calib-data", omniglot_paths[0], "--calib-images", "64", *extra)
    assert r.exit_code == 0, r.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.spec.colour == "RGB" and bundle.spec.height == side and bundle.embedding_dim == dim
    # CL2N where asked, or where the checkpoint records it as its deployment (validation chose it)
    assert ("centered" in bundle.manifest["output"]) == ("--center" in extra or name in RECORDS_CL2N)
    if extra:  # CL2N from the feature mean stored in the shipped checkpoint: no training data needed
        assert bundle.manifest["output"]["centered"]["source"] == "checkpoint"
        assert bundle.head.flip_shots or "efficientnet" in name
    if "efficientnet" in name:  # ImageNet-pretrained: the provenance and the weights' license travel with it
        assert bundle.manifest["model"]["pretrained"]["license"] == "Apache-2.0" and (tmp_path / "b" / "NOTICE").is_file()
    assert bundle.manifest["variants"]["fp32"]["parity"]["max_rel_error"] < 1e-4
    # colour images a user might enroll: three hues with texture; held-out samples of each hue come back right
    rng = np.random.default_rng(0)

    def photo(hue):
        base = np.array(hue, np.float32)
        img = base * rng.uniform(0.6, 1.0, (side, side, 1)) + rng.normal(0, 12, (side, side, 3))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    hues = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    clf = FewShotClassifier.load(tmp_path / "b")
    for name, hue in hues.items():
        clf.enroll(name, [photo(hue) for _ in range(5)])
    queries = [(name, photo(hue)) for name, hue in hues.items() for _ in range(4)]
    labels = clf.predict([q for _, q in queries]).labels
    assert labels == [name for name, _ in queries]


def test_self_distillation_learns_from_a_pretrain_runs_teacher(tmp_path, omniglot_paths):
    """--algo distill: a student pre-trained again on the teacher's softened logits plus the labels;
    the teacher must keep its classifier (last.safetensors), and only the student ships."""
    from edgemeta.checkpoint import load_checkpoint
    data = [x for p in omniglot_paths for x in ("--data", p)]
    common = [*data, "--split-mode", "seeded", "--batch-size", "32", "--episodes", "12", "--val-every", "6",
              "--val-episodes", "20", "--quiet"]
    assert run_cli("train", "--algo", "pretrain", *common, "--out", tmp_path / "teacher").exit_code == 0
    bad = run_cli("train", "--algo", "distill", "--teacher", tmp_path / "teacher" / "best.safetensors", *common,
                  "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "no classifier over the training classes" in bad.output
    assert "needs" in run_cli("train", "--algo", "distill", *common, "--out", tmp_path / "y").output
    r = run_cli("train", "--algo", "distill", "--teacher", tmp_path / "teacher" / "last.safetensors", *common,
                "--out", tmp_path / "student")
    assert r.exit_code == 0, r.output
    student = load_checkpoint(tmp_path / "student" / "best.safetensors")
    assert not any(k.startswith(("teacher.", "classifier.")) for k in student.model_state)
    assert student.meta["algorithm"] == "distill" and student.device_head.metric == "cosine"
    log = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["episode"] == 12 and np.isfinite(log[-1]["loss"])


def _image_batch_run(omniglot_paths) -> list:
    """Flags of a six-step pretrain/distill run on the Omniglot fixture, batches of 32."""
    data = [x for p in omniglot_paths for x in ("--data", p)]
    return [*data, "--split-mode", "seeded", "--batch-size", "32", "--episodes", "6", "--val-every", "6",
            "--val-episodes", "10", "--quiet"]


def _assert_refused(common: list, tmp_path, *cases: tuple[list, str]) -> None:
    """Each (flags, message): `edgemeta train` refuses it with exit status 2 and that message."""
    for bad_args, message in cases:
        bad = run_cli("train", *bad_args, *common, "--out", tmp_path / "x")
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_rotation_self_supervision_is_an_auxiliary_head_that_never_ships(tmp_path, omniglot_paths):
    """--rotation-weight: a second head learns the quarter turn of a rotated copy of each batch; the
    run's last checkpoint keeps it (to resume), the shipped best does not; other algorithms refuse it."""
    from edgemeta.runtime.preprocess import InputSpec

    from edgemeta.algorithms import create_algorithm
    from edgemeta.algorithms.base import LearnerSettings, Step
    from edgemeta.backbones import Embedder
    from edgemeta.checkpoint import load_checkpoint
    common = _image_batch_run(omniglot_paths)
    r = run_cli("train", "--algo", "pretrain", "--rotation-weight", "0.5", *common, "--out", tmp_path / "rot")
    assert r.exit_code == 0, r.output
    assert any(k.startswith("rotation_head.") for k in load_checkpoint(tmp_path / "rot" / "last.safetensors").model_state)
    assert not any(k.startswith("rotation_head.") for k in load_checkpoint(tmp_path / "rot" / "best.safetensors").model_state)
    _assert_refused(common, tmp_path, (["--algo", "protonet", "--rotation-weight", "0.5"], "auxiliary loss of pretrain and distill"))
    # the auxiliary loss is the rotation head's cross-entropy on really rotated images
    torch.manual_seed(0)
    learner = create_algorithm("pretrain", Embedder("conv4", InputSpec(28, 28, "L")), LearnerSettings(n_classes=3, rotation_weight=1.0))
    x = torch.rand(8, 1, 28, 28)
    seen = []
    step = Step(index=0, meta_batch=1, way=3, episodes=list, images=lambda j: (np.arange(8), np.zeros(8, np.int64)),
                inputs=lambda idx: x, forward=lambda *a: seen.append(a) or learner(*a), average_gradients=lambda m: None,
                average_tensors=lambda d: d)
    logits, aux = learner._logits_and_aux(step, x, 0)
    turns = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(0))
    rotated = seen[0][1]
    for i in range(8):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))
    expected = torch.nn.functional.cross_entropy(learner.rotation_head(learner.embedder(rotated)), turns)
    assert logits.shape == (8, 3) and aux.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_cosine_classifier_trains_ships_without_itself_and_teaches(tmp_path, omniglot_paths):
    """--classifier cosine (Baseline++): logits are a learned scale times the cosine to each class's
    weight vector; the run trains, the shipped best holds no classifier, a distill run takes the
    cosine teacher, and other algorithms or unknown kinds are refused in one line."""
    from edgemeta.runtime.preprocess import InputSpec

    from edgemeta.algorithms import create_algorithm
    from edgemeta.algorithms.base import LearnerSettings
    from edgemeta.backbones import Embedder
    from edgemeta.checkpoint import load_checkpoint
    common = _image_batch_run(omniglot_paths)
    r = run_cli("train", "--algo", "pretrain", "--classifier", "cosine", *common, "--out", tmp_path / "cos")
    assert r.exit_code == 0, r.output
    last = load_checkpoint(tmp_path / "cos" / "last.safetensors")
    assert {"classifier.weight", "classifier.log_scale"} <= set(last.model_state)
    assert last.meta["train_config"]["classifier"] == "cosine"
    assert last.model_state["classifier.log_scale"].item() != pytest.approx(np.log(10.0))  # the scale learns
    assert not any(k.startswith("classifier.") for k in load_checkpoint(tmp_path / "cos" / "best.safetensors").model_state)
    d = run_cli("train", "--algo", "distill", "--teacher", tmp_path / "cos" / "last.safetensors", *common,
                "--out", tmp_path / "student")
    assert d.exit_code == 0, d.output
    _assert_refused(common, tmp_path, (["--algo", "protonet", "--classifier", "cosine"], "not protonet's"),
                    (["--algo", "pretrain", "--classifier", "arcface"], "unknown classifier 'arcface'"))
    # the logits: scale × cosine, whatever the embedding's and the weights' norms
    torch.manual_seed(0)
    learner = create_algorithm("pretrain", Embedder("conv4", InputSpec(28, 28, "L")),
                               LearnerSettings(n_classes=3, classifier="cosine"))
    z = torch.randn(4, learner.embedder.embed_dim)
    w = learner.classifier.weight
    expected = 10.0 * torch.nn.functional.cosine_similarity(z[:, None], w[None], dim=2)
    assert torch.allclose(learner.classifier(z), expected, atol=1e-5)
    assert torch.allclose(learner.classifier(7 * z), expected, atol=1e-5)


def test_mixup_mixes_each_batch_with_its_shuffled_copy_and_weights_the_loss_alike(tmp_path, omniglot_paths):
    """--mixup α: the images the network sees are λ·x + (1 − λ)·x[perm] with λ from Beta(α, α), the
    loss λ·CE(y) + (1 − λ)·CE(y[perm]); the same step gives the same mix; a training run with it
    works, a distill run takes it, and episodic algorithms or an α out of range are refused in one line."""
    from edgemeta.runtime.preprocess import InputSpec

    from edgemeta.algorithms import create_algorithm
    from edgemeta.algorithms.base import LearnerSettings, Step
    from edgemeta.backbones import Embedder
    common = _image_batch_run(omniglot_paths)
    r = run_cli("train", "--algo", "pretrain", "--classifier", "cosine", "--mixup", "0.4", *common, "--out", tmp_path / "mix")
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["episode"] == 6 and np.isfinite(log[-1]["loss"])
    d = run_cli("train", "--algo", "distill", "--teacher", tmp_path / "mix" / "last.safetensors", "--mixup", "0.4",
                *common, "--out", tmp_path / "student")
    assert d.exit_code == 0, d.output
    _assert_refused(common, tmp_path, (["--algo", "protonet", "--mixup", "0.4"], "not protonet's episodes"),
                    (["--algo", "pretrain", "--mixup", "-1"], "mixup must be a number in [0, 10]"))

    torch.manual_seed(0)
    learner = create_algorithm("pretrain", Embedder("conv4", InputSpec(28, 28, "L")), LearnerSettings(n_classes=3, mixup=0.4))
    x, labels = torch.rand(8, 1, 28, 28), np.array([0, 1, 2, 0, 1, 2, 0, 1])
    step = Step(index=5, meta_batch=1, way=3, episodes=list, images=lambda j: (np.arange(8), labels),
                inputs=lambda idx: x, forward=learner, average_gradients=lambda m: None, average_tensors=lambda d: d)
    mixed, y = learner._batch(step, 0)
    assert 0 < y.lam < 1 and sorted(y.other.tolist()) == sorted(labels.tolist())
    for i in range(8):  # every row: λ of its own image and 1 − λ of one image of the class its second label names
        assert any(torch.allclose(mixed[i], y.lam * x[i] + (1 - y.lam) * x[k], atol=1e-6)
                   for k in range(8) if labels[k] == int(y.other[i]))
    assert not torch.equal(mixed, x)
    again, y2 = learner._batch(step, 0)
    assert torch.equal(again, mixed) and y2.lam == y.lam  # seeded by the step: a resumed run mixes alike
    logits = torch.randn(8, 3)
    loss, acc = y.loss(logits)
    ce = torch.nn.functional.cross_entropy
    assert loss.item() == pytest.approx((y.lam * ce(logits, torch.from_numpy(labels)) + (1 - y.lam) * ce(logits, y.other)).item(), rel=1e-6)
    off = create_algorithm("pretrain", Embedder("conv4", InputSpec(28, 28, "L")), LearnerSettings(n_classes=3))
    plain, y0 = off._batch(step, 0)
    assert plain is x and y0.other is None  # off: the batch as it came
