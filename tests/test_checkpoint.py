import os
import pickle

import pytest
import torch
from edgemeta.runtime import CheckpointError, InputSpec

from edgemeta.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_keeps_weights_and_metadata(tiny_run):
    ckpt = load_checkpoint(tiny_run / "best.safetensors")
    assert ckpt.meta["backbone"] == {"name": "conv4", "args": {}}
    assert ckpt.meta["embedding_dim"] == 64
    assert ckpt.meta["head"]["kind"] == "prototype"
    assert ckpt.meta["train_config"]["way"] == 10
    spec = ckpt.spec
    assert (spec.height, spec.width, spec.colour) == (28, 28, "L") and 0.8 < spec.mean[0] < 1.0
    embedder = ckpt.build_embedder()
    path = save_checkpoint(tiny_run / "copy.safetensors", {"embedder." + k: v for k, v in embedder.state_dict().items()},
                           {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "edgemeta_version")})
    again = load_checkpoint(path)
    assert again.meta == ckpt.meta
    x = torch.rand(4, 1, 28, 28) * 255
    assert torch.equal(again.build_embedder()(x), embedder(x))


def test_training_checkpoint_carries_optimizer_state(tiny_run):
    last = load_checkpoint(tiny_run / "last.safetensors")
    assert last.optimizer_state is not None
    assert set(last.optimizer_state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert load_checkpoint(tiny_run / "best.safetensors").optimizer_state is None


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.safetensors"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(evil)
    assert not marker.exists()
    # a torch.save() file (zip + pickle) is refused the same way
    torch.save({"w": torch.zeros(2), "x": _Exploit(marker)}, tmp_path / "torch.pt")
    with pytest.raises(CheckpointError, match="not an edgemeta checkpoint"):
        load_checkpoint(tmp_path / "torch.pt")
    assert not marker.exists()


def test_foreign_safetensors_and_missing_files_are_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not an edgemeta checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    spec = InputSpec(28, 28)
    save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(3)}, {"input": spec.to_dict()})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_each_shipped_checkpoint_is_what_its_config_trains_and_names_no_local_path():
    """checkpoints/NAME.safetensors was trained with configs/NAME.toml (every training field the
    checkpoint records equals the config's, the data included, by dataset name), and nothing in its
    metadata points outside the repository or at a machine (no absolute path, no `..`)."""
    from conftest import ROOT

    from edgemeta.config import TrainConfig
    from edgemeta.data.catalog import CATALOG
    free = {"out", "quiet", "resume", "vectorize", "channels_last"}  # where a run wrote, how it ran: not what it trained
    shipped = sorted((ROOT / "checkpoints").glob("*.safetensors"))
    assert len(shipped) >= 14
    for path in shipped:
        config = ROOT / "configs" / f"{path.stem}.toml"
        assert config.is_file(), f"{path.name} has no configs/{config.name} to reproduce it"
        wanted = TrainConfig.from_toml(config).to_dict()
        meta = load_checkpoint(path).meta
        recorded = meta["train_config"]
        differ = {k: (wanted[k], recorded[k]) for k in wanted if k in recorded and k not in free and wanted[k] != recorded[k]}
        assert not differ, f"{path.name} was not trained with {config.name}: {differ}"
        assert all(d.partition(":")[0] in CATALOG for d in recorded["data"]), recorded["data"]
        for text in _strings(meta):
            assert not (text.startswith(("/", "~")) or "../" in text or "\\" in text), f"{path.name} names {text!r}"


def _strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
