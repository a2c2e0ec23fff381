"""Data parallelism without a wrapper: each rank takes a strided shard of every global batch, and
the gradients of the trainable tensors are summed over ranks with one all-reduce per tensor.

Each rank's loss is its *summed* loss divided by the size of the *global* batch, so the summed
gradients equal the gradient of the global batch's mean loss exactly, however unevenly the batch
splits. Started by ``torchrun`` (which sets RANK / WORLD_SIZE / MASTER_ADDR); gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, index: list[int]) -> list[int]:
        """This rank's share of a global batch: positions rank, rank + size, ..."""
        return index[self.rank::self.size]


def init_world() -> World:
    """The process group torchrun asked for (gloo), or a one-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend=os.environ.get("EDGEADAPT_DIST_BACKEND", "gloo"))
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def all_reduce_grads(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum each parameter's gradient over ranks (a missing gradient counts as zero)."""
    if world.size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
