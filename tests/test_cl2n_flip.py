"""Better heads, free at run time: CL2N (centre on the training classes' mean embedding, then
L2-normalise) baked into the exported graph, and flipped-shot enrollment in the runtime. Both must
give the torch evaluation's accuracy through the deployed path on the same episodes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import FewShotClassifier, load_bundle
from edgemeta.runtime.heads import HeadConfig

from edgemeta.checkpoint import load_checkpoint
from edgemeta.features import cl2n, feature_mean


@pytest.fixture(scope="module")
def cl2n_bundle(tiny_run, tmp_path_factory, omniglot_paths):
    out = tmp_path_factory.mktemp("cl2n") / "b"
    r = run_cli("export", tiny_run / "best.safetensors", "--out", out, "--center", "--flip-shots",
                "--calib-data", omniglot_paths[0])
    assert r.exit_code == 0, r.output
    return out


def test_cl2n_is_in_the_graph_and_the_head_flips_shots(cl2n_bundle, tiny_run, omniglot):
    b = load_bundle(cl2n_bundle)
    assert b.l2_normalized and b.head.flip_shots and b.head.metric == "cosine"
    assert b.manifest["output"]["centered"]["split"] == "train" and b.manifest["output"]["centered"]["images"] > 100
    ckpt = load_checkpoint(tiny_run / "best.safetensors")
    mean, _ = feature_mean(ckpt)
    from edgemeta.features import embed_pixels
    want = cl2n(embed_pixels(ckpt.build_embedder(), omniglot.pixels[:32]), mean)
    got = FewShotClassifier.load(cl2n_bundle).embed(omniglot.pixels[:32])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_the_feature_mean_is_the_training_split_sample_of_the_full_load(tiny_run):
    """Computed from the run's data, decoding only its sample: the same images, so the same mean,
    as taking the sample from the whole decoded training split."""
    from edgemeta.data import load_dataset, select_split
    from edgemeta.features import embed_pixels
    ckpt = load_checkpoint(tiny_run / "best.safetensors")
    tc, spec = ckpt.meta["train_config"], ckpt.spec
    mean, about = feature_mean(ckpt, max_images=300)
    train = select_split(load_dataset(tc["data"], (spec.height, spec.width), spec.colour, tc.get("layout", "auto")),
                         "train", tc.get("split_mode", "auto"), tc.get("split_seed", 0), tc.get("split_file", ""))
    pick = np.sort(np.random.default_rng(0).choice(len(train), 300, replace=False))
    np.testing.assert_allclose(mean, embed_pixels(ckpt.build_embedder(), train.pixels[pick]).mean(0), atol=1e-6)
    assert about == {"images": 300, "classes": train.n_classes, "split": "train"}


def test_cl2n_and_flipped_shots_match_torch_evaluation_within_0_2_points(cl2n_bundle, tiny_run, omniglot_paths):
    common = ["--data", str(omniglot_paths[0]), "--data", str(omniglot_paths[1]), "--split-mode", "seeded",
              "--way", "5", "--shot", "1", "--episodes", "300", "--json"]
    torch_run = run_cli("eval", tiny_run / "best.safetensors", "--center", "--flip-shots", *common)
    assert torch_run.exit_code == 0, torch_run.output
    deployed = run_cli("eval", "--bundle", cl2n_bundle, *common)
    assert deployed.exit_code == 0, deployed.output
    t, d = json.loads(torch_run.stdout), json.loads(deployed.stdout)
    assert t["head"]["flip_shots"] and d["head"]["flip_shots"]
    assert abs(t["accuracy"] - d["accuracy"]) <= 0.2
    plain = json.loads(run_cli("eval", "--bundle", cl2n_bundle, "--no-flip-shots", *common).stdout)
    assert plain["accuracy"] != d["accuracy"]  # the flag reaches the support embeddings


def test_flipped_shot_enrollment_averages_each_image_with_its_mirror(tiny_bundle, tagalog):
    shots = tagalog[sorted(tagalog)[0]][:3]
    plain = FewShotClassifier.load(tiny_bundle)
    flipped = FewShotClassifier.load(tiny_bundle, head=HeadConfig(flip_shots=True))
    flipped.enroll("a", shots)
    from edgemeta.runtime.preprocess import load_images
    pixels = load_images(shots, plain.bundle.spec)
    want = (plain.embed(pixels) + plain.embed(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
    np.testing.assert_allclose(flipped._state.classes[0].embeddings, want, atol=1e-6)
    assert HeadConfig.from_dict(HeadConfig(kind="ridge", flip_shots=True).to_dict()).flip_shots


def test_a_shipped_half_checkpoint_keeps_its_feature_mean_and_exports_without_training_data(tiny_run, tmp_path, omniglot_paths):
    import json as _json

    from safetensors.torch import load_file, save_file

    from edgemeta.checkpoint import ship_checkpoint
    shipped = ship_checkpoint(tiny_run / "best.safetensors", tmp_path / "ship.safetensors", half=True)
    full = load_checkpoint(tiny_run / "best.safetensors")
    small = load_checkpoint(shipped)
    assert shipped.stat().st_size < 0.6 * (tiny_run / "best.safetensors").stat().st_size
    assert all(small.model_state[k].dtype == v.dtype for k, v in full.model_state.items())  # loaded back as float32
    mean, about = feature_mean(small)
    assert about["source"] == "checkpoint" and mean.shape == (full.meta["embedding_dim"],)
    # the training data is gone: export --center still works from the stored mean
    tensors = load_file(shipped)
    with open(shipped, "rb") as f:
        meta = _json.loads(_json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]["edgemeta"])
    meta["train_config"]["data"] = ["/nowhere/omniglot.zip"]
    save_file(tensors, tmp_path / "moved.safetensors", metadata={"edgemeta": _json.dumps(meta)})
    r = run_cli("export", tmp_path / "moved.safetensors", "--out", tmp_path / "b", "--center", "--calib-data", omniglot_paths[0])
    assert r.exit_code == 0, r.output
    assert load_bundle(tmp_path / "b").manifest["output"]["centered"]["source"] == "checkpoint"


def test_a_checkpoint_shipped_with_cl2n_exports_and_evaluates_centred_unless_told_not_to(tiny_run, tmp_path, omniglot_paths):
    from edgemeta.checkpoint import ship_checkpoint
    shipped = ship_checkpoint(tiny_run / "best.safetensors", tmp_path / "ship.safetensors", center=True)
    assert load_checkpoint(shipped).center and not load_checkpoint(tiny_run / "best.safetensors").center
    info = run_cli("inspect", shipped, "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["center"] is True
    calib = ["--calib-data", str(omniglot_paths[0]), "--calib-images", "32"]
    assert run_cli("export", shipped, "--out", tmp_path / "c", *calib).exit_code == 0
    assert run_cli("export", shipped, "--out", tmp_path / "p", "--no-center", *calib).exit_code == 0
    centred, plain = load_bundle(tmp_path / "c"), load_bundle(tmp_path / "p")
    assert centred.l2_normalized and centred.manifest["output"]["centered"]["source"] == "checkpoint"
    assert "centered" not in plain.manifest["output"] and not plain.l2_normalized
    common = ["--data", str(omniglot_paths[0]), "--data", str(omniglot_paths[1]), "--split-mode", "seeded",
              "--way", "5", "--shot", "1", "--episodes", "100", "--json"]
    default, on, off = (json.loads(run_cli("eval", shipped, *flag, *common).stdout)
                        for flag in ([], ["--center"], ["--no-center"]))
    assert default["accuracy"] == on["accuracy"] != off["accuracy"]
    assert default["head"]["metric"] == "cosine"
