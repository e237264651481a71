"""Distributed meta-training: 2 CPU processes (gloo), each with its own episodes; gradients are
averaged, so both ranks end with identical weights; only rank 0 writes."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import OMNIGLOT
from edgemeta.runtime.progress import SILENT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, algo: str, out: str, cache: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      EDGEMETA_CACHE=cache)
    torch.set_num_threads(1)
    from edgemeta.config import TrainConfig
    from edgemeta.train import train
    cfg = TrainConfig(data=[str(p) for p in OMNIGLOT], split_mode="seeded", algo=algo, way=5, shot=1, query=3,
                      meta_batch=2, inner_steps=1, episodes=3, val_every=3, val_episodes=5, out=out, seed=0)
    result = train(cfg, progress=SILENT)
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items() if v is not None},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("algo", ["protonet", "fomaml", "reptile"])
def test_two_ranks_end_with_identical_weights(tmp_path, algo):
    out = str(tmp_path)
    mp.spawn(_rank, args=(2, _free_port(), algo, out, os.environ["EDGEMETA_CACHE"]), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # training moved the weights (each rank saw different episodes, averaged gradients kept them equal)
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one log, from rank 0 only
