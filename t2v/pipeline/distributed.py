"""Data parallelism over prompts under torchrun: each rank takes every world_size-th prompt."""
from __future__ import annotations

import os


def world() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard(items: list, rank: int, world_size: int) -> list:
    """Round-robin share of `items` for `rank`."""
    return items[rank::world_size]
