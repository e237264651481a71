"""Distributed meta-training: 2 CPU processes (gloo), each with its own episodes; gradients are
averaged, so both ranks end with identical weights; only rank 0 writes."""
import json
import os
import socket
import sys
import time

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
    import gc

    import torch.distributed as td
    from torch.nn.parallel import DistributedDataParallel

    from edgemeta.config import TrainConfig
    from edgemeta.train import train
    destroy = td.destroy_process_group

    def destroy_and_count_wrappers(*args, **kwargs):  # wrappers alive when the group goes (must be none)
        with open(os.path.join(out, f"rank{rank}-wrappers.txt"), "w") as f:
            f.write(str(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())))
        return destroy(*args, **kwargs)
    td.destroy_process_group = destroy_and_count_wrappers
    cfg = TrainConfig(data=[str(p) for p in OMNIGLOT], split_mode="seeded", algo=algo, way=5, shot=1, query=3,
                      meta_batch=2, inner_steps=1, episodes=3, val_every=3, val_episodes=5, out=out, seed=0)
    result = train(cfg, progress=SILENT)
    torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items() if v is not None},
               os.path.join(out, f"rank{rank}.pt"))
    if sys.platform.startswith("linux"):  # the threads alive after train(), by name
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        with open(os.path.join(out, f"rank{rank}-threads.txt"), "w") as f:
            f.write("\n".join(names))


@pytest.mark.parametrize("algo", ["protonet", "fomaml", "reptile"])
def test_two_ranks_end_with_identical_weights(tmp_path, algo):
    out = str(tmp_path)
    ranks = mp.spawn(_rank, args=(2, _free_port(), algo, out, os.environ["EDGEMETA_CACHE"]), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a rank that hangs (in the group's teardown, say) fails here, not at CI's limit
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("a rank was still running after 180 s")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # training moved the weights (each rank saw different episodes, averaged gradients kept them equal)
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # one log, from rank 0 only
    # the process group is gone when train() returns: a gloo worker thread still alive at interpreter
    # exit may take the GIL while it finalises, which aborts the process (SIGABRT, "terminate called")
    for rank in (0, 1) if sys.platform.startswith("linux") else ():
        threads = (tmp_path / f"rank{rank}-threads.txt").read_text().split()
        assert not [t for t in threads if "gloo" in t or "tcpstore" in t], threads
    # nor may DistributedDataParallel's reducer outlive the group: freed last, it stops gloo's threads
    # holding the GIL, and hangs if a worker is still letting go of a collective's tensors
    assert [(tmp_path / f"rank{rank}-wrappers.txt").read_text() for rank in (0, 1)] == ["0", "0"]


def _torchrun_two_nodes(out, episodes: int, resume: bool, port: int) -> list:
    """The multi-node form of torchrun (c10d rendezvous), simulated with two "nodes" on 127.0.0.1."""
    import subprocess
    import sys
    from pathlib import Path
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"edgemeta-test-{port}", "-m", "edgemeta", "train",
           "--data", str(OMNIGLOT[1]), "--split-mode", "seeded", "--way", "5", "--episodes", str(episodes),
           "--val-every", "3", "--val-episodes", "10", "--out", str(out), "--quiet", *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results, deadline = [], time.monotonic() + 180
    for n in nodes:
        try:  # communicate, not wait: a node's pipes are read while it runs, so a long log cannot block it
            out_text, err_text = n.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for m in nodes:  # torchrun stops its workers, which run in sessions of their own, on SIGTERM
                m.terminate()
            for m in nodes:
                try:
                    m.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    m.kill()
            pytest.fail("a torchrun node was still running after 180 s")
        results.append((n.returncode, out_text, err_text))
    return results


def test_multi_node_torchrun_reports_once_without_stride_warnings_and_resumes(tmp_path):
    out = tmp_path / "run"
    for episodes, resume in ((6, False), (9, True)):
        results = _torchrun_two_nodes(out, episodes, resume, _free_port())
        assert all(code == 0 for code, _, _ in results), results
        stdout = "".join(o for _, o, _ in results)
        stderr = "".join(e for _, _, e in results)
        assert stdout.count("best validation accuracy") == 1, stdout  # only rank 0 reports
        assert "Grad strides do not match" not in stderr and "terminate called" not in stderr
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["episode"] == 9 and [r["episode"] for r in logs if "val_acc" in r] == [3, 6, 9]
