"""torchrun support: rank, world size, barrier. One process without torchrun is rank 0 of 1.

The process group is set up from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...) with
gloo on CPU and nccl on GPUs; nothing here is cluster code of our own.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group torchrun describes, once; a no-op without torchrun."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


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
    """Sum numeric figures over ranks (every rank gets the totals)."""
    if not active():
        return figures
    keys = sorted(figures)
    t = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))
