"""`distill.compile_memory_budget`: the compiled blocks save a share of their activations and recompute the cheap
rest in the backward (AOT autograd's `activation_memory_budget`, set by `qdiff.distill.checkpointing.compiled`).
Checked on a CPU with the aot_eager backend (AOT autograd's partitioner, no code generation): fewer bytes saved,
the same gradients, the setting only inside the context, and the trainer passing the config value on."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._functorch import config as functorch_config

from qdiff.config import ConfigError
from qdiff.distill import checkpointing, trainer
from qdiff.distill.checkpointing import compiled

from .test_distill_speed_checkpointing import DEPTH, make_config, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ModulatedMLP(nn.Module):
    """h [B, N, C] -> [B, N, C]: LayerNorm, modulate, MLP, residual: the cheap ops around an STDiT block's GEMMs."""

    def __init__(self, channels=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.modulation = nn.Parameter(torch.randn(2, channels) * 0.1)

    def forward(self, h):
        x = F.layer_norm(h, h.shape[-1:]) * (1 + self.modulation[0]) + self.modulation[1]
        return h + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def saved_bytes_and_grads(block, h, memory_budget):
    """Bytes the compiled forward saves for its backward, and the gradients of a loss (input first)."""
    torch._dynamo.reset()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with compiled([block], memory_budget=memory_budget, backend="aot_eager"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = block(h)
    grads = torch.autograd.grad(out.square().sum(), [h, *block.parameters()])
    torch._dynamo.reset()
    return sum(saved), grads


def test_budget_saves_less_and_keeps_the_gradients():
    torch.manual_seed(0)
    block = ModulatedMLP()
    h = torch.randn(4, 64, 32, requires_grad=True)
    eager = torch.autograd.grad(block(h).square().sum(), [h, *block.parameters()])
    full, full_grads = saved_bytes_and_grads(block, h, 1.0)
    half, half_grads = saved_bytes_and_grads(block, h, 0.5)
    assert half < 0.75 * full, (half, full)  # the recomputed elementwise ops are not saved
    for got, want in zip(half_grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(full_grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_budget_only_inside_the_context():
    before = functorch_config.activation_memory_budget
    module = nn.Linear(2, 2)
    with compiled([module], memory_budget=0.3, backend="aot_eager"):
        assert functorch_config.activation_memory_budget == 0.3
    assert functorch_config.activation_memory_budget == before
    with compiled([module], backend="aot_eager"):  # None: torch's own setting
        assert functorch_config.activation_memory_budget == before
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="memory_budget"):
            with compiled([module], memory_budget=bad, backend="aot_eager"):
                pass
    assert "forward" not in vars(module)


def test_trainer_passes_the_budget(tmp_path, monkeypatch):
    budgets = []

    def recording(modules, memory_budget=None, **kwargs):
        budgets.append(memory_budget)
        return checkpointing.compiled(modules, memory_budget=memory_budget, backend="aot_eager", **kwargs)

    monkeypatch.setattr(trainer, "compiled", recording)
    plain, _, _ = run(make_config(iterations=3), tmp_path / "eager")
    torch._dynamo.reset()
    budgeted, _, _ = run(make_config(iterations=3, compile=True, compile_memory_budget=0.3), tmp_path / "budget")
    torch._dynamo.reset()
    assert budgets == [0.3] and budgeted["checkpointed_blocks"] == DEPTH  # on a CPU every block is checkpointed
    for (got, want) in zip(budgeted["history"], plain["history"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_config_key():
    assert make_config().distill.compile_memory_budget == 0.5
    assert make_config(compile_memory_budget="1").distill.compile_memory_budget == 1.0
    for bad in (0, 1.5, "half"):
        with pytest.raises(ConfigError, match="compile_memory_budget"):
            make_config(compile_memory_budget=bad)
