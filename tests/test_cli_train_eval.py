"""The train / eval / inspect commands end to end on the shipped Omniglot slice."""
import json

import pytest
from conftest import run_cli


def _data(paths):
    return [x for p in paths for x in ("--data", p)]


def test_training_writes_checkpoints_and_a_jsonl_log_that_learns(tiny_run):
    assert (tiny_run / "best.safetensors").exists() and (tiny_run / "last.safetensors").exists()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [10, 15, 20, 30]  # every 10 episodes and at each validation
    assert [r["episode"] for r in records if "val_acc" in r] == [15, 30]
    assert records[-1]["loss"] < records[0]["loss"]
    # 5-way 1-shot on held-out alphabets: far above the 20% of chance after 30 episodes
    assert max(r.get("val_acc", 0) for r in records) > 50


def test_eval_prints_accuracy_with_ci_and_is_reproducible(tiny_run, omniglot_paths):
    args = ["eval", tiny_run / "best.safetensors", *_data(omniglot_paths), "--split-mode", "seeded",
            "--episodes", "100", "--json"]
    first = json.loads(run_cli(*args).stdout)
    second = json.loads(run_cli(*args).stdout)
    assert first == second
    assert 50 < first["accuracy"] <= 100 and 0 < first["ci95"] < 5
    assert first["episodes"] == 100 and first["way"] == 5 and first["shot"] == 1
    five_shot = json.loads(run_cli(*args, "--shot", "5").stdout)
    assert five_shot["accuracy"] > first["accuracy"]
    text = run_cli(*args[:-1]).stdout
    assert "5-way 1-shot" in text and "±" in text


@pytest.mark.parametrize("head", ["ridge", "logistic"])
def test_eval_with_other_device_heads(tiny_run, omniglot_paths, head):
    out = run_cli("eval", tiny_run / "best.safetensors", *_data(omniglot_paths), "--split-mode", "seeded",
                  "--episodes", "50", "--head", head, "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["head"]["kind"] == head and result["accuracy"] > 40


def test_resume_continues_from_the_last_checkpoint(tmp_path, omniglot_paths):
    common = [*_data(omniglot_paths), "--split-mode", "seeded", "--way", "5", "--query", "2", "--val-every", "4",
              "--val-episodes", "10", "--out", tmp_path, "--quiet"]
    assert run_cli("train", *common, "--episodes", "4").exit_code == 0
    result = run_cli("train", *common, "--episodes", "8", "--resume")
    assert result.exit_code == 0, result.output
    episodes = [json.loads(line)["episode"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert episodes == [4, 8]  # log_every=10 → one record per validation; 1..4 not redone


def test_a_split_file_without_validation_classes_trains_on_every_class_and_ships_the_last_step(tmp_path, omniglot,
                                                                                               omniglot_paths):
    """The final run of a recipe chosen on the validation classes: training and validation classes
    together, no validation; every save is the result, resumable like any run."""
    groups = sorted(set(omniglot.groups))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": groups[:6], "val": [], "test": groups[6:]}))
    n_train = sum(g in groups[:6] for g in omniglot.groups)
    common = [*_data(omniglot_paths), "--split-file", split, "--way", "5", "--query", "2", "--val-every", "3",
              "--out", tmp_path / "r"]
    first = run_cli("train", *common, "--episodes", "3", "--quiet")
    assert first.exit_code == 0, first.output
    result = run_cli("train", *common, "--episodes", "6", "--resume")
    assert result.exit_code == 0, result.output
    assert "trained on every class (the split file names no validation classes)" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in records] == [3, 6] and not any("val_acc" in r for r in records)
    from edgemeta.checkpoint import load_checkpoint
    best, last = load_checkpoint(tmp_path / "r" / "best.safetensors"), load_checkpoint(tmp_path / "r" / "last.safetensors")
    assert best.meta["episode"] == last.meta["episode"] == 6
    assert best.meta["train_classes"] == last.meta["train_classes"] == 4 * n_train  # each with its 3 rotations
    assert all(v.equal(last.embedder_state()[k]) for k, v in best.embedder_state().items())
    assert best.meta["metrics"] == {"val_protocol": "none: the split file names no validation classes"}
    refused = run_cli("eval", tmp_path / "r" / "best.safetensors", *_data(omniglot_paths), "--split-file", split,
                      "--split", "val")
    assert refused.exit_code == 2 and refused.output == f"error: the val split of {split} has no classes in this data\n"
    tested = run_cli("eval", tmp_path / "r" / "best.safetensors", *_data(omniglot_paths), "--split-file", split,
                     "--episodes", "20", "--json")
    assert tested.exit_code == 0 and json.loads(tested.stdout)["accuracy"] > 40


def test_toml_config_with_flag_override(tmp_path, omniglot_paths):
    cfg = tmp_path / "c.toml"
    cfg.write_text("data = [{}]\nsplit_mode = 'seeded'\nway = 5\nquery = 2\nepisodes = 2\nval_every = 2\n"
                   "val_episodes = 5\nalgo = 'r2d2'\n".format(", ".join(f"'{p}'" for p in omniglot_paths)))
    result = run_cli("train", "--config", cfg, "--out", tmp_path / "r", "--quiet", "--episodes", "3")
    assert result.exit_code == 0, result.output
    meta = json.loads(run_cli("inspect", tmp_path / "r" / "last.safetensors", "--json").stdout)
    assert meta["algorithm"] == "r2d2" and meta["head"]["kind"] == "ridge" and meta["episode"] == 3


def test_inspect_shows_what_a_checkpoint_holds(tiny_run):
    out = run_cli("inspect", tiny_run / "best.safetensors")
    assert out.exit_code == 0
    for word in ("conv4", "111,68", "28×28", "prototype", "episodes trained"):
        assert word in out.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "/no/such/dir", "--quiet"], "data path not found"),
    (["train", "--backbone", "vgg", "--quiet"], "unknown backbone 'vgg'"),
    (["train", "--shot", "19", "--query", "5", "--quiet"], "lower --shot"),
    (["train", "--algo", "magic", "--quiet"], "unknown algorithm"),
    (["train", "--metric", "manhattan", "--quiet"], "unknown metric 'manhattan'"),
    (["train", "--data", "/no/such/dir", "--split-mode", "alphabet", "--quiet"], "unknown split mode 'alphabet'"),
    (["train", "--precision", "fp16", "--quiet"], "precision must be fp32 or bf16, not 'fp16'"),
    (["train", "--quiet"], "no training data"),
    (["eval", "/no/such.safetensors"], "checkpoint not found"),
    (["inspect", "/no/such.safetensors"], "not found"),
])
def test_user_mistakes_end_in_one_clear_line(args, message, omniglot_paths, tmp_path):
    if args[0] == "train" and "--data" not in args and message != "no training data":
        args = args + [*_data(omniglot_paths), "--split-mode", "seeded", "--out", str(tmp_path)]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one line, possibly wrapped by the terminal width


def test_auto_on_off_switches_resolve_per_device_and_refuse_other_values(tmp_path, omniglot_paths):
    from edgemeta.config import TrainConfig
    cpu, cuda = TrainConfig(data=["x"]), TrainConfig(data=["x"], device="cuda")
    assert (cpu.switch("channels_last"), cpu.switch("vectorize")) == (True, False)
    assert (cuda.switch("channels_last"), cuda.switch("vectorize")) == (False, True)
    assert TrainConfig(data=["x"], channels_last="off").switch("channels_last") is False
    cfg = tmp_path / "c.toml"
    cfg.write_text("data = [{}]\nchannels_last = 'sideways'\n".format(", ".join(f"'{p}'" for p in omniglot_paths)))
    result = run_cli("train", "--config", cfg, "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and "channels_last must be auto, on or off, not 'sideways'" in result.output
    assert not (tmp_path / "r").exists()


def test_every_train_flag_is_a_train_config_field():
    """`edgemeta train`'s options are TrainConfig's fields under the same names (a flag that is not a
    field, or is spelt differently, could never reach the training)."""
    import inspect

    from edgemeta.cli.training import train as train_command
    from edgemeta.config import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__)
    flags = set(inspect.signature(train_command).parameters) - {"config", "resume", "quiet"}
    assert flags <= fields, sorted(flags - fields)


def test_each_training_setting_is_declared_once():
    """The train command's options come from TrainConfig's fields (every one but backbone_args, a
    TOML table) with their help; the learners' defaults are TrainConfig's."""
    import dataclasses

    from edgemeta.algorithms import LearnerSettings
    from edgemeta.cli.training import train
    from edgemeta.config import HELP, TrainConfig
    options = {p.name for p in train.__wrapped__.__signature__.parameters.values()}
    assert options == {f.name for f in dataclasses.fields(TrainConfig)} - {"backbone_args"} | {"config", "resume", "quiet"}
    assert set(HELP) == {f.name for f in dataclasses.fields(TrainConfig)} - {"backbone_args"}
    defaults = TrainConfig.__dataclass_fields__
    for f in dataclasses.fields(LearnerSettings):
        if f.name in defaults and f.name != "vectorize":  # vectorize: TrainConfig's auto/on/off, resolved per device
            assert f.default == defaults[f.name].default, f.name
    r = run_cli("train", "--help")
    assert "--lr-schedule" in r.output and "--freeze-blocks" in r.output and "--val-shot" in r.output


def test_the_train_help_names_every_registered_choice():
    """`edgemeta train --help` is built without importing torch, so edgemeta/config.py's HELP names
    the algorithms, backbones and other choices in words: they must be exactly what is registered."""
    from edgemeta.runtime.heads import METRICS

    from edgemeta.algorithms import ALGORITHMS
    from edgemeta.backbones import list_backbones
    from edgemeta.config import HELP
    from edgemeta.data.loading import LAYOUTS
    from edgemeta.data.splits import SPLIT_MODES

    def listed(key: str) -> list[str]:
        text = HELP[key].split(":", 1)[-1] if ":" in HELP[key] else HELP[key]
        return [w.strip().split(" ")[0] for w in text.split("|")]
    for key, registered in (("algo", ALGORITHMS), ("backbone", list_backbones()), ("layout", LAYOUTS),
                            ("split_mode", SPLIT_MODES), ("metric", METRICS)):
        assert sorted(listed(key)) == sorted(registered), key
