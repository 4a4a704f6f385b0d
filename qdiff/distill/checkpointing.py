"""Gradient checkpointing of some of a model's blocks (`distill.checkpoint_blocks`).

    with checkpointed(model.blocks[:k]):   # these k blocks are recomputed in the backward pass
        loss.backward()

Checkpointing every block keeps only the block inputs but runs every block's forward twice; each
block left out saves that recompute and costs its saved activations instead (~5 GB per STDiT-XL/2
block at batch 4, 16x512x512). `auto_checkpoint_count` picks the fewest checkpointed blocks whose
measured peak memory fits a limit. Recomputation repeats the same operations, so the gradients do
not depend on which blocks are checkpointed.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["auto_checkpoint_count", "checkpointed"]


@contextmanager
def checkpointed(modules: Sequence[nn.Module]):
    """For the duration, each of `modules` runs under non-reentrant `torch.utils.checkpoint` when grad is on.

    The module objects, their parameter names and state dicts are untouched (an instance `forward`
    shadows the class's, and is removed on exit).
    """
    modules = list(modules)
    for module in modules:
        module.forward = functools.partial(_checkpoint_call, module.forward)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _checkpoint_call(forward: Callable, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def auto_checkpoint_count(num_blocks: int, peak_bytes: Callable[[int], float], limit_bytes: float) -> int:
    """The fewest checkpointed blocks (the first k of `num_blocks`) whose training step fits `limit_bytes`.

    `peak_bytes(k)` runs one forward + backward with k blocks checkpointed and returns its peak memory
    (raising torch.OutOfMemoryError if it does not fit). The saving per block is measured from
    k = n and k = n − 1, the count estimated from it, then checked (and raised where it does not fit).
    """
    peak_all = peak_bytes(num_blocks)
    if num_blocks == 0 or peak_all > limit_bytes:
        return num_blocks
    try:
        per_block = peak_bytes(num_blocks - 1) - peak_all
    except torch.OutOfMemoryError:
        return num_blocks
    if per_block <= 0:  # recomputing saves nothing here
        return 0
    count = num_blocks - min(num_blocks, math.floor((limit_bytes - peak_all) / per_block))
    while count < num_blocks:
        try:
            excess = peak_bytes(count) - limit_bytes
        except torch.OutOfMemoryError:
            excess = per_block
        if excess <= 0:
            break
        count = min(num_blocks, count + math.ceil(excess / per_block))
    return count
