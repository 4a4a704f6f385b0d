"""`distill.checkpoint_blocks: auto`: the decision from injected memory numbers (CPU), the probe's measurements,
and the trainer's wiring with torch.cuda's memory counters faked.

The memory model of a training step with k of n blocks checkpointed (the first k) that the fakes follow is the
real one: a checkpointed block keeps its input (I), an unchecked one its activations (A) until the backward; the
backward of a recomputed block, or of the first unchecked block, holds one block's activations on top. So the
peaks with k = n and k = n − 1 are nearly equal, which is what broke the old probe.
"""
import dataclasses
import math

import pytest
import torch
from torch import nn

from qdiff.config import QuantConfig
from qdiff.distill import trainer
from qdiff.distill.checkpointing import CheckpointPlan, plan_checkpoint_count, probe_checkpoint_count

GIB = 2**30
N = 28


def memory_model(k, n=N, base=4.0, block_input=0.3, activations=5.5, transient=1.0):
    """(held at the end of the forward, peak) in GiB with k of n blocks checkpointed."""
    unchecked = n - k
    held = k * block_input + unchecked * activations
    peak = base + k * block_input + max(unchecked, 1) * activations + transient
    return held, peak


def fake_probe(capacity=float("inf"), extra=0.0, **model):
    """probe(count) in bytes; OutOfMemoryError above `capacity` GiB; `extra` GiB more when > 2 blocks are unchecked."""
    calls = []

    def probe(count):
        calls.append(count)
        held, peak = memory_model(count, **model)
        if N - count > 2:
            peak += extra
        if peak > capacity:
            raise torch.OutOfMemoryError("fake")
        return held * GIB, peak * GIB
    return probe, calls


def test_plan_from_injected_numbers():
    # an H100 run: 79 GiB available, 85% budget, 19.8 GiB peak with all checkpointed, 5.2 GiB per block
    budget = 0.85 * 79.0
    assert plan_checkpoint_count(N, 19.8, 5.2, budget) == N - math.floor((budget - 19.8) / 5.2) == 19
    assert plan_checkpoint_count(N, 19.8, 5.2, 1000.0) == 0  # everything fits: nothing recomputed
    assert plan_checkpoint_count(N, 19.8, 5.2, 24.9) == N  # not even one unchecked block fits
    assert plan_checkpoint_count(N, 19.8, 5.2, 25.1) == N - 1
    assert plan_checkpoint_count(N, 70.0, 5.2, budget) == N  # all checkpointed is over budget already
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # a failed measurement: all checkpointed
        assert plan_checkpoint_count(N, 19.8, bad, budget) == N
    assert plan_checkpoint_count(0, 19.8, 5.2, budget) == 0


def test_probe_measures_held_memory_not_equal_peaks():
    """The peaks at n and n − 1 differ by one block input only; the held memory gives the per-block cost."""
    assert memory_model(N)[1] - memory_model(N - 1)[1] == pytest.approx(0.3)
    probe, calls = fake_probe()
    budget = 60 * GIB
    plan = probe_checkpoint_count(N, probe, budget, available=budget / 0.85)
    per_block = 5.5 - 0.3
    peak_all = memory_model(N)[1]
    expected = N - math.floor((60 - peak_all) / per_block)
    assert plan.per_block == pytest.approx(per_block * GIB)
    assert plan.peak_all == pytest.approx(peak_all * GIB)
    assert plan.checkpointed == expected and 0 < expected < N
    assert calls == [N, N - 1, expected]  # two measurements and one check
    assert plan.verified_peak == pytest.approx(memory_model(expected)[1] * GIB) and plan.verified_peak <= budget
    line = plan.describe()
    assert f"{N - expected} of {N} blocks unchecked" in line and "5.20 GiB per unchecked block" in line
    assert "85% of" in line


def test_probe_raises_the_count_when_the_check_does_not_fit():
    probe, calls = fake_probe(extra=12.0)  # memory grows faster than linearly past two unchecked blocks
    plan = probe_checkpoint_count(N, probe, 60 * GIB)
    assert plan.verified_peak <= 60 * GIB and len(calls) > 3
    assert plan.checkpointed > calls[2]  # raised from the first estimate


def test_probe_never_leaves_the_run_worse_than_all_checkpointed():
    probe, calls = fake_probe(capacity=10.0)  # even the first probe runs out of memory
    plan = probe_checkpoint_count(N, probe, 60 * GIB)
    assert plan.checkpointed == N and "out of memory" in plan.reason and calls == [N]
    probe, calls = fake_probe(capacity=memory_model(N)[1] + 0.01)  # every check runs out of memory
    plan = probe_checkpoint_count(N, probe, 60 * GIB, max_retries=3)
    assert plan.checkpointed == N and "did not fit" in plan.reason and len(calls) == 2 + 3
    probe, _ = fake_probe(activations=0.3)  # no measurable per-block cost
    assert probe_checkpoint_count(N, probe, 60 * GIB).checkpointed == N
    probe, calls = fake_probe()
    plan = probe_checkpoint_count(N, probe, 1000 * GIB)  # all fit
    assert plan.checkpointed == 0 and calls == [N, N - 1, 0]
    probe, calls = fake_probe()
    plan = probe_checkpoint_count(N, probe, 20 * GIB)  # no unchecked block fits: no check needed
    assert plan.checkpointed == N and calls == [N, N - 1]


class FakeCudaMemory:
    """torch.cuda's counters, driven by a fake training step (GiB)."""

    def __init__(self, monkeypatch, total=80.0, persistent=3.0, grads=0.2):
        self.total, self.allocated, self.peak, self.grads = total, persistent, persistent, grads
        self.have_grads, self.emptied = False, 0
        for name, fn in {
            "memory_allocated": lambda device=None: self.allocated * GIB,
            "max_memory_allocated": lambda device=None: self.peak * GIB,
            "reset_peak_memory_stats": lambda device=None: setattr(self, "peak", self.allocated),
            "mem_get_info": lambda device=None: ((self.total - self.allocated - 1.0) * GIB, self.total * GIB),
            "memory_reserved": lambda device=None: (self.allocated + 1.0) * GIB,
            "empty_cache": lambda: setattr(self, "emptied", self.emptied + 1),
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def step(self, modules, after_forward, oom_above=float("inf")):
        """One forward + backward: allocations follow `memory_model`; gradients appear in the first backward."""
        k = sum("forward" in vars(m) for m in modules)  # checkpointed blocks carry an instance forward
        held, peak = memory_model(k, n=len(modules), base=0.0)
        if peak > oom_above:
            raise torch.OutOfMemoryError("fake")
        start = self.allocated
        self.allocated = start + held
        after_forward()
        first = not self.have_grads
        self.peak = max(self.peak, start + peak + (self.grads if first else 0.0))
        self.allocated = start + (self.grads if first else 0.0)
        self.have_grads = True


def auto_config(**overrides):
    return dataclasses.replace(QuantConfig.from_dict({"method": "qvdit", "weight": {"bits": 4}, "act": {"bits": 8},
                                                      "tqe": {"rank": 4}}).distill, **overrides)


def test_trainer_probe_wiring_with_faked_cuda_counters(monkeypatch):
    memory = FakeCudaMemory(monkeypatch)
    modules = [nn.Linear(2, 2) for _ in range(N)]
    cfg = auto_config(checkpoint_memory_fraction=0.5)
    plan = trainer._checkpoint_plan(cfg, modules, torch.device("cuda"), lambda after: memory.step(modules, after),
                                    probe=True)
    available = memory.total  # free (total − allocated − 1) + reserved by this process (allocated + 1)
    assert plan.available == pytest.approx(available * GIB) and plan.budget == pytest.approx(0.5 * available * GIB)
    # the gradients appearing in the first step must not count as a block's cost
    assert plan.per_block == pytest.approx((5.5 - 0.3) * GIB)
    expected = plan_checkpoint_count(N, plan.peak_all, plan.per_block, plan.budget)
    assert plan.checkpointed == expected and 0 < expected < N
    assert all("forward" not in vars(m) for m in modules)  # probe wrappers removed
    assert memory.emptied >= 1


def test_trainer_probe_out_of_memory_falls_back_to_all(monkeypatch):
    memory = FakeCudaMemory(monkeypatch)
    modules = [nn.Linear(2, 2) for _ in range(N)]
    plan = trainer._checkpoint_plan(auto_config(), modules, torch.device("cuda"),
                                    lambda after: memory.step(modules, after, oom_above=1.0), probe=True)
    assert plan.checkpointed == N and "out of memory" in plan.reason and memory.emptied >= 2


def test_trainer_plan_without_probe():
    modules = [nn.Linear(2, 2) for _ in range(4)]

    def never(after):
        raise AssertionError("no probe expected")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert trainer._checkpoint_plan(auto_config(), modules, cpu, never, probe=True).checkpointed == 4
    assert trainer._checkpoint_plan(auto_config(), modules, cuda, never, probe=False).checkpointed == 4
    assert trainer._checkpoint_plan(auto_config(checkpoint_blocks="all"), modules, cuda, never, True).checkpointed == 4
    assert trainer._checkpoint_plan(auto_config(checkpoint_blocks=9), modules, cuda, never, True).checkpointed == 4
    assert trainer._checkpoint_plan(auto_config(checkpoint_blocks=1), modules, cuda, never, True).checkpointed == 1
    assert trainer._checkpoint_plan(auto_config(grad_checkpointing=False), modules, cuda, never, True).checkpointed == 0
    assert isinstance(trainer._checkpoint_plan(auto_config(), [], cuda, never, True), CheckpointPlan)
