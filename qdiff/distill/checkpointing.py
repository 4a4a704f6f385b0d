"""Gradient checkpointing (and optional torch.compile) of some of a model's blocks during distillation.

    with checkpointed(model.blocks[:k]):   # these k blocks are recomputed in the backward pass
        loss.backward()

Checkpointing every block keeps only the block inputs but runs every block's forward twice; each
block left out saves that recompute and costs its saved activations instead (several GiB per
STDiT-XL/2 block at batch 4, 16x512x512). `distill.checkpoint_blocks: auto` measures that cost and
leaves as many blocks unchecked as fit a share of the GPU memory (`probe_checkpoint_count`, deciding
with `plan_checkpoint_count`). Recomputation repeats the same operations, so the gradients do not
depend on which blocks are checkpointed.

Why the measurement is of the memory held after the forward, not of the step's peak: the first
blocks are checkpointed and the last ones are not, so the unchecked blocks run their backward first.
With one block unchecked, the step's peak is that block's backward, and with every block checkpointed
it is the backward of a recomputed block; both hold one block's activations, so the peaks are equal
and their difference says nothing (the probe before issue 4's fix read it as "no saving" and then
walked through ~28 out-of-memory probes back to all checkpointed). What each unchecked block adds is
visible at the end of the forward: the memory still allocated there, with one block unchecked minus
with none, is that block's saved activations minus the input a checkpointed block keeps.

`compiled` turns inductor's mix-order reduction off (`TRAINING_INDUCTOR_OPTIONS`). That fusion (Triton
backends only, on by default in recent torch) computes a row and a column reduction of one tensor in one
kernel. In the backward of a rank-1 TQE post term W_eff = Q(W') + b_out·a_out those are grad(b_out) =
Σ_cols(G·a_out) [d_out, 1] and grad(a_out) = Σ_rows(G·b_out) [1, d_in] of the same G = ∂L/∂W_eff, and
inductor's size heuristics (torch 2.13: d_out·d_in ≥ 5·2^20, d_out ≥ 4096, d_out ≥ 2·d_in) pick it in
STDiT-XL/2 for `mlp.fc1` only (G [4608, 1152]), never in the tiny preset. The torch 2.11 of the H100 runs
returned that column sum as [d_in], and autograd refused it: "CompiledFunctionBackward returned an invalid
gradient at index 103 - got [1152] but expected shape compatible with [1, 1152]" (input 103 of a block's
graph is `mlp.fc1.lora_a_out`; pytorch/pytorch#178080, fixed upstream by #178098, which 2.13 has). The same
fusion had silent wrong-gradient bugs too (#190796, #193061, #195845). Without it these sums are ordinary
reductions (only their summation order differs). Nothing else in the distillation backward should be a
candidate (the blocks' LayerNorms have no affine parameters and everything but TQE terms and Δ is frozen), so
little speed is at stake (not measured).
"""
from __future__ import annotations

import functools
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["TRAINING_INDUCTOR_OPTIONS", "CheckpointPlan", "checkpointed", "compiled", "plan_checkpoint_count",
           "probe_checkpoint_count", "training_compile_kwargs"]

log = logging.getLogger(__name__)

GIB = 2**30


@contextmanager
def checkpointed(modules: Sequence[nn.Module]):
    """For the duration, each of `modules` runs under non-reentrant `torch.utils.checkpoint` when grad is on.

    The module objects, their parameter names and state dicts are untouched (an instance `forward`
    shadows the class's, and the previous instance attribute, e.g. a compiled forward, is restored on exit).
    """
    modules = list(modules)
    previous = [vars(module).get("forward") for module in modules]
    for module in modules:
        module.forward = functools.partial(_checkpoint_call, module.forward)
    try:
        yield
    finally:
        for module, before in zip(modules, previous):
            _restore_forward(module, before)


# Inductor options of the compiled training blocks (see the module docstring); those the installed torch
# does not know are left out (mix-order reduction exists from torch 2.10 on).
TRAINING_INDUCTOR_OPTIONS = {"triton.mix_order_reduction": False}


@contextmanager
def compiled(modules: Sequence[nn.Module], memory_budget: float | None = None, fallback: bool = False,
             **compile_kwargs):
    """For the duration, each of `modules` runs `torch.compile(module.forward, dynamic=False, **compile_kwargs)`.

    With the inductor backend (the default) the compile also gets `TRAINING_INDUCTOR_OPTIONS` (mix-order
    reduction off: with it, torch 2.11 returned the gradient of STDiT-XL/2's `mlp.fc1.lora_a_out` [1, 1152]
    as [1152]; module docstring); options or a mode given by the caller are kept, an option given explicitly wins.
    Inside `checkpointed`, the checkpoint wraps the compiled forward (the recompute runs the compiled code
    again). Parameters and state dicts are untouched; the eager forward is back on exit.

    memory_budget (0, 1] (None: torch's setting, 1.0 by default): AOT autograd's `activation_memory_budget` for
    the graphs compiled meanwhile. Below 1, the partitioner saves only about that share of what each compiled
    forward would keep for its backward and recomputes the rest in the backward, the cheapest ops first (by its
    FLOP estimate: normalisations, modulation, activations before any matmul). An unchecked block then holds less,
    so `checkpoint_blocks: auto` leaves more blocks unchecked. The graph is fixed at its first call, so the budget
    in force then is the one it keeps.

    fallback: a graph that fails to compile runs eagerly instead, with torch's warning
    (`torch._dynamo.config.suppress_errors` for the duration); False raises the compile error.
    """
    import torch._dynamo

    modules = list(modules)
    budget = nullcontext() if memory_budget is None else _activation_memory_budget(memory_budget)
    errors = torch._dynamo.config.patch(suppress_errors=True) if fallback else nullcontext()
    compile_kwargs = training_compile_kwargs(**compile_kwargs)
    previous = [vars(module).get("forward") for module in modules]
    for module in modules:
        module.forward = torch.compile(module.forward, **compile_kwargs)
    try:
        with budget, errors:
            yield
    finally:
        for module, before in zip(modules, previous):
            _restore_forward(module, before)


def _activation_memory_budget(budget: float):
    if not 0 < budget <= 1:
        raise ValueError(f"memory_budget: expected a share in (0, 1], got {budget!r}")
    from torch._functorch import config as functorch_config

    return functorch_config.patch(activation_memory_budget=float(budget))


def training_compile_kwargs(**compile_kwargs) -> dict:
    """The `torch.compile` keyword arguments `compiled` uses: dynamic=False, plus, for inductor,
    `TRAINING_INDUCTOR_OPTIONS` merged into `options` (a `mode` is expanded into its options first, as
    torch.compile accepts only one of the two)."""
    kwargs = {"dynamic": False, **compile_kwargs}
    if kwargs.get("backend", "inductor") != "inductor":
        return kwargs
    from torch._inductor import config as inductor_config, list_mode_options

    known = inductor_config.get_config_copy()
    defaults = {key: value for key, value in TRAINING_INDUCTOR_OPTIONS.items() if key in known}
    if not defaults:
        return kwargs
    mode = kwargs.pop("mode", None)
    options = dict(kwargs.pop("options", None) or {})
    if mode not in (None, "default"):
        options = {**list_mode_options(mode, kwargs["dynamic"]), **options}
    kwargs["options"] = {**defaults, **options}
    return kwargs


def _restore_forward(module: nn.Module, before) -> None:
    if before is None:
        vars(module).pop("forward", None)
    else:
        module.forward = before


def _checkpoint_call(forward: Callable, *args, **kwargs):
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


@dataclass
class CheckpointPlan:
    """What `probe_checkpoint_count` measured and chose (bytes; None where not measured)."""

    checkpointed: int
    num_blocks: int
    budget: float | None = None
    available: float | None = None
    peak_all: float | None = None
    per_block: float | None = None
    verified_peak: float | None = None
    reason: str = ""

    def describe(self) -> str:
        """One log line with the numbers."""
        def gib(value):
            return "?" if value is None else f"{value / GIB:.2f}"

        fraction = "" if not self.available else f" ({self.budget / self.available:.0%} of {gib(self.available)} GiB available)"
        return (f"checkpoint_blocks auto: {self.num_blocks - self.checkpointed} of {self.num_blocks} blocks unchecked, "
                f"{self.checkpointed} checkpointed; budget {gib(self.budget)} GiB{fraction}, peak with all checkpointed "
                f"{gib(self.peak_all)} GiB, {gib(self.per_block)} GiB per unchecked block, verified peak "
                f"{gib(self.verified_peak)} GiB" + (f"; {self.reason}" if self.reason else ""))


def plan_checkpoint_count(num_blocks: int, peak_all: float, per_block: float, budget: float) -> int:
    """How many blocks to checkpoint (the first ones) so that the step's peak stays within `budget`.

    peak_all: the measured peak of a step with every block checkpointed; per_block: the memory one more
    unchecked block keeps until the backward. A step with u unchecked blocks peaks at most at
    peak_all + u·per_block (the all-checkpointed peak already holds one recomputed block's activations,
    so this is one block conservative), hence u = floor((budget − peak_all) / per_block), within [0, n].
    A non-positive or non-finite per_block means the measurement failed: everything stays checkpointed.
    """
    if num_blocks <= 0:
        return 0
    if not math.isfinite(per_block) or per_block <= 0 or not math.isfinite(peak_all) or peak_all > budget:
        return num_blocks
    unchecked = min(num_blocks, math.floor((budget - peak_all) / per_block))
    return num_blocks - unchecked


def probe_checkpoint_count(num_blocks: int, probe: Callable[[int], tuple[float, float]], budget: float,
                           available: float | None = None, max_retries: int = 3) -> CheckpointPlan:
    """Measure, decide and verify the number of checkpointed blocks for "auto".

    probe(count) runs one training step (forward + backward, no optimizer step) with the first `count`
    blocks checkpointed and returns (bytes allocated at the end of the forward, peak bytes of the step);
    it may raise torch.OutOfMemoryError. Steps: probe(n) and probe(n − 1) give peak_all and the
    per-block cost (held(n − 1) − held(n)); `plan_checkpoint_count` picks the count; one more probe at
    that count checks the peak, and where it exceeds the budget the count is raised by the excess over
    the per-block cost (at most `max_retries` times). Any out-of-memory error, or a count that still does
    not fit, gives every block checkpointed: the probe never leaves the run worse off than "all".
    """
    plan = CheckpointPlan(checkpointed=num_blocks, num_blocks=num_blocks, budget=budget, available=available)
    if num_blocks == 0:
        plan.checkpointed, plan.reason = 0, "no blocks"
        return plan
    try:
        held_all, plan.peak_all = probe(num_blocks)
        held_one, _ = probe(num_blocks - 1)
    except torch.OutOfMemoryError:
        plan.reason = "a probe step ran out of memory: all checkpointed"
        return plan
    plan.per_block = held_one - held_all
    count = plan_checkpoint_count(num_blocks, plan.peak_all, plan.per_block, budget)
    if plan.per_block <= 0:
        plan.reason = "per-block cost not measurable: all checkpointed"
        return plan
    if count == num_blocks:
        plan.verified_peak = plan.peak_all
        plan.reason = "no unchecked block fits the budget" if plan.peak_all + plan.per_block > budget else ""
        return plan
    for _ in range(max_retries):
        try:
            _, peak = probe(count)
        except torch.OutOfMemoryError:
            peak = float("inf")
        if peak <= budget:
            plan.checkpointed, plan.verified_peak = count, peak
            return plan
        excess = plan.per_block if not math.isfinite(peak) else peak - budget
        count = min(num_blocks, count + max(1, math.ceil(excess / plan.per_block)))
        if count == num_blocks:
            break
    plan.checkpointed, plan.verified_peak = num_blocks, plan.peak_all
    plan.reason = "the chosen count did not fit when verified: all checkpointed"
    return plan
