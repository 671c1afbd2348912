"""torchrun support: rank, world size, barrier. One process without torchrun is rank 0 of 1.

The process group is set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) with gloo on CPU and nccl on GPUs; nothing here is cluster code of our own. On GPUs the
group has both backends ("cpu:gloo,cuda:nccl"): DDP's gradients go through nccl, the small figures
the stages add up over ranks stay CPU tensors and go through gloo.

Collectives wait SAD_PIPE_DIST_TIMEOUT_MIN minutes (default 720) before failing: rank 0 tokenizes and
packs the whole dataset while the other ranks wait at the first barrier of cache-teacher, which on a
real corpus takes far longer than torch's default of 10 to 30 minutes. A rank that crashes does not
leave the others waiting that long: torchrun stops every worker when one fails.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV = "SAD_PIPE_DIST_TIMEOUT_MIN"


def init() -> None:
    """Join the process group torchrun describes, once; a no-op without torchrun (or with one process)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before nccl starts: one GPU per rank
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "720"))))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def sum_figures(figures: dict[str, float]) -> dict[str, float]:
    """Sum numeric figures over ranks (every rank gets the totals). A key some rank lacks counts as 0
    there: a rank may have had nothing to measure (its slice of the last eval batch was empty)."""
    if not active():
        return figures
    names: list = [None] * world_size()
    dist.all_gather_object(names, sorted(figures))
    keys = sorted(set().union(*names))
    t = torch.tensor([float(figures.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (every rank gets the total); a no-op in one process. The caller
    keeps the layout the same on every rank, so unlike sum_figures nothing is exchanged but the numbers."""
    if active():
        dist.all_reduce(t)
    return t
