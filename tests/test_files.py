"""One way to write a file (edgemeta.runtime.files.atomic_write), used by every artifact: a crash
between the write and the rename leaves the previous file, and no temp file, for each kind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from edgemeta.runtime import files
from edgemeta.runtime.bundle import read_manifest, write_manifest
from edgemeta.runtime.errors import StorageError
from edgemeta.runtime.heads import HeadConfig
from edgemeta.runtime.store import EnrollmentStore, StoreState

from edgemeta.checkpoint import load_checkpoint, save_checkpoint
from edgemeta.data.imageset import ImageSet
from edgemeta.data.loading import _read_cache, _write_cache


def _manifest(dim: int) -> dict:
    return {"schema": "edgemeta-bundle", "schema_version": "1.0", "edgemeta_version": "0", "created": "now",
            "model": {"backbone": "conv4"},
            "input": {"name": "pixels", "height": 28, "width": 28, "colour": "L", "mean": [0.5], "std": [0.5]},
            "output": {"name": "embedding", "dim": dim, "l2_normalized": False},
            "head": {"kind": "prototype"}, "files": {}, "variants": {}, "engines": []}


def _checkpoint(path, value: float):
    meta = {"input": {"height": 28, "width": 28, "colour": "L", "mean": [0.5], "std": [0.5]},
            "backbone": {"name": "conv4", "args": {}}, "embedding_dim": 64, "head": {"kind": "prototype"}}
    save_checkpoint(path, {"w": torch.full((2,), value)}, meta)


def _checkpoint_value(path) -> float:
    return float(load_checkpoint(path).model_state["w"][0])


ARTIFACTS = {
    "checkpoint": (lambda p, v: _checkpoint(p / "c.safetensors", v), lambda p: _checkpoint_value(p / "c.safetensors")),
    "manifest": (lambda p, v: write_manifest(p, _manifest(int(v))), lambda p: read_manifest(p)["output"]["dim"]),
    "store": (lambda p, v: EnrollmentStore(p / "s").write(StoreState("sha", "fp32", int(v), HeadConfig())),
              lambda p: EnrollmentStore(p / "s").read().embedding_dim),
    "dataset cache": (lambda p, v: _write_cache(p / "cache.npz", ImageSet(np.full((1, 2, 2, 1), int(v), np.uint8),
                                                                           np.zeros(1, np.int64), ["a"], ["a"])),
                      lambda p: int(_read_cache(p / "cache.npz").pixels[0, 0, 0, 0])),
}


@pytest.mark.parametrize("kind", list(ARTIFACTS))
def test_a_crash_before_the_rename_keeps_the_previous_file(kind, tmp_path, monkeypatch):
    write, read = ARTIFACTS[kind]
    write(tmp_path, 7)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def crash(*args, **kwargs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(files.os, "replace", crash)
    if kind == "dataset cache":
        write(tmp_path, 9)  # a cache that cannot be written only costs time: no error
    else:
        with pytest.raises((OSError, StorageError)):  # the store says which store it could not save
            write(tmp_path, 9)
    monkeypatch.undo()
    assert read(tmp_path) == 7
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no temp file left
