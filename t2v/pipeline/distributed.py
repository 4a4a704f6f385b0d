"""Data parallelism over prompts under torchrun: each rank takes every world_size-th prompt.

Stages that only need "wait until every rank is done" (stage 3 writes its index after all shards exist)
use `init_process_group_if_needed` + `barrier`; plain runs (WORLD_SIZE unset or 1) never touch
torch.distributed.
"""
from __future__ import annotations

import datetime
import os

import torch


def world() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of `items` for `rank`."""
    return items[rank::world_size]


def init_process_group_if_needed(device: str | torch.device = "cpu", timeout_minutes: float = 180) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl for a CUDA device, gloo otherwise).

    Returns True when a group is (now) initialised. The long default timeout covers a barrier that waits
    for the slowest rank's sampling. Plain runs return False and do nothing.
    """
    _, world_size = world()
    if world_size <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    if backend == "nccl":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, **kwargs)
    return True


def barrier() -> None:
    """Wait for every rank (no-op without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group_if_needed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
