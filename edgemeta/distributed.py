"""torchrun / DistributedDataParallel plumbing for training: gloo on CPU, nccl on GPU; each rank
draws its own episodes; only rank 0 writes checkpoints and logs. A no-op in a single process.
Multi-node runs are the same code: torchrun sets RANK and WORLD_SIZE across machines."""
from __future__ import annotations

import gc
import os

import torch


class Distributed:
    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled:
            # torch.distributed.nn imported before the group exists: its functions' `group=` defaults
            # would otherwise hold the group for the life of the process (torch._dynamo imports it
            # mid-training), and destroy_process_group could not stop gloo's threads before the
            # interpreter exits
            import torch.distributed as td
            import torch.distributed.nn  # noqa: F401
            if not td.is_initialized():
                td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            self.td = td

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def episode_index(self, step: int, per_rank: int) -> int:
        """The first episode index of this rank's tasks at `step` (ranks never share an episode)."""
        return (step * self.world + self.rank) * per_rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)

    def broadcast(self, model: torch.nn.Module) -> None:
        if self.enabled:
            # the model's own tensors, not `.data` views: a view's Python object dies when the call
            # returns, and gloo's worker, which lets go of the tensors a moment later, would then free
            # it and need the GIL — a deadlock when that moment falls in the group's teardown, which
            # DistributedDataParallel's reducer runs holding the GIL
            with torch.no_grad():
                for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
                    self.td.broadcast(t, 0)

    def average_gradients(self, model: torch.nn.Module) -> None:
        if self.enabled:
            for p in model.parameters():
                if p.grad is not None:
                    self.td.all_reduce(p.grad)
                    p.grad /= self.world

    def average_tensors(self, tensors: dict) -> dict:
        if self.enabled:
            for t in tensors.values():
                self.td.all_reduce(t)
                t /= self.world
        return tensors

    def close(self, model: torch.nn.Module) -> None:
        if self.enabled:
            # DDP syncs BatchNorm statistics from rank 0 at each forward; the last forward's update is
            # local, so end with rank 0's statistics everywhere (what the checkpoint holds).
            self.broadcast(model)
            self.td.barrier()
            # The group must go with destroy_process_group, which lets go of the GIL while gloo's
            # threads stop. DistributedDataParallel's reducer also holds the group, and when it is the
            # last owner it stops them holding the GIL: a deadlock if a worker is still letting go of a
            # finished collective's tensors, which needs the GIL. The caller has dropped its wrapper
            # (train() does before calling this); collected here, as it may sit in a reference cycle.
            gc.collect()
            self.td.destroy_process_group()
