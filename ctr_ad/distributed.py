"""Data-parallel context for ``torchrun`` launches (DDP: NCCL on GPUs, gloo on CPU).

A process started by ``torchrun`` sees ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment;
with ``WORLD_SIZE > 1`` :func:`init` joins the process group. Each rank then trains on its shard of
every global batch (see ``ctr_ad.data``) and DDP averages the gradients. A single process (no
torchrun, or ``WORLD_SIZE=1``) gets a context with ``world == 1`` and no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str, *, join_single: bool = False) -> DistContext:
    """Join the process group when launched with WORLD_SIZE > 1 (idempotent).

    ``join_single``: join it also when ``torchrun`` started one process (component parallelism runs
    its collectives then, so ``--nproc_per_node 1`` checks the NCCL path on a one-GPU machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if world < 1 or (world == 1 and not (join_single and launched)):
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (keeps decisions such as early stopping in lockstep)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def any_rank(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (one small all-reduce; cheap every step)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
