"""Data parallelism across processes: torchrun's ranks with DDP (gloo on the CPU, nccl on GPUs).

Started by `torchrun --nproc_per_node N`, a run trains each rank on its share of every
batch, splits the validation scenes between ranks and combines the sums; rank 0 alone
reads and writes files. Alone, `Dist()` is rank 0 of 1 and every method is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline.core.device import pick_device


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (the tensor itself when alone)."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu() / self.world
        return values

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        return values

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (files are read on rank 0 only: no shared disk needed)."""
        if self.world > 1:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()



def init_distributed(setting: str = "auto") -> Dist:
    """DDP from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); alone otherwise. The
    device is the config's `device` (`pipeline.core.device`); on GPUs each rank takes the one
    of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(setting)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device)
