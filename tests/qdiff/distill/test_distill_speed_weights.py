"""qdiff.distill.weights: W_eff once per iteration (fused forward, hand-written STE backward) equals the per-call
autograd path, values and gradients, bit for bit in fp32 on CPU."""
import itertools

import pytest
import torch
from torch import nn

from qdiff.api import init_weight_quantizers, quant_layers, quantize_model
from qdiff.balancing import hadamard
from qdiff.config import QuantConfig
from qdiff.distill.trainer import distill
from qdiff.distill.weights import training_weight, weights_once
from qdiff.layers.quant_linear import QuantLinear
from qdiff.quantizers.config import TQEConfig, WeightQuantConfig
from qdiff.quantizers.uniform import quant_range


def make_layer(symmetric, group_size, rank_out, balance, frames, learnable_delta=True):
    torch.manual_seed(0)
    layer = QuantLinear(torch.randn(24, 32), torch.randn(24),
                        WeightQuantConfig(bits=3, symmetric=symmetric, group_size=group_size,
                                          learnable_delta=learnable_delta),
                        None, TQEConfig(rank=4, rank_out=rank_out), num_frames=frames)
    with torch.no_grad():  # TQE terms as after some training (B, B_out start at zero)
        layer.lora_b.normal_(0, 0.05)
        layer.lora_b_out.normal_(0, 0.05)
    if balance == "smooth":
        layer.set_balance(torch.rand(32) + 0.5)
    elif balance == "rotate":
        layer.set_balance(torch.rand(32) + 0.5, hadamard(32))
    layer.quant_weight = True
    layer.effective_weight()  # initialises Δ, z on W' + B·A
    with torch.no_grad():  # then B moves (as in training), so some weights leave the grid: the STE clamp branch
        layer.lora_b.add_(torch.randn_like(layer.lora_b), alpha=0.2)
    return layer


def output_and_grads(layer, x, fused):
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with weights_once(layer) if fused else torch.enable_grad():
        y = layer(x)
        (y.square().sum() + y.sum()).backward()
    return y.detach(), {name: p.grad.clone() for name, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("symmetric,group_size,rank_out,balance,frames", [
    *itertools.product([False, True], [None, 8], [1], [None], [None, 3]),
    (False, None, 2, "smooth", 3),
    (False, 8, 1, "rotate", None),
    (True, None, 2, "smooth", None),
])
def test_fused_weight_path_equals_per_call_autograd(symmetric, group_size, rank_out, balance, frames):
    layer = make_layer(symmetric, group_size, rank_out, balance, frames)
    x = torch.randn(5, frames or 4, 32) * 3
    y_ref, grads_ref = output_and_grads(layer, x, fused=False)
    y, grads = output_and_grads(layer, x, fused=True)
    assert torch.equal(y, y_ref)
    assert grads.keys() == grads_ref.keys() and "weight_quantizer.delta" in grads
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name]), name
    with torch.no_grad():  # some weights are clamped: both branches of the STE are exercised
        w = (layer.balanced_weight() + layer.lora_b @ layer.lora_a).reshape(24, -1, group_size or 32)
        codes = (w / layer.weight_quantizer.delta[0]).round() + layer.weight_quantizer.zero_point[0]
        q_min, q_max = quant_range(3, symmetric)
        assert 0 < ((codes < q_min) | (codes > q_max)).float().mean() < 0.5
    assert "effective_weight" not in vars(layer)  # the override is gone after the block


def test_training_weight_without_learnable_delta():
    layer = make_layer(False, None, 1, None, None, learnable_delta=False)
    weight = training_weight(layer)
    assert torch.equal(weight.detach(), layer.effective_weight().detach())
    weight.sum().backward()
    assert layer.weight_quantizer.delta.grad is None and layer.lora_a.grad is not None


class ToyVideoModel(nn.Module):
    """x [B, C, T, H, W] -> [B, C, T, H, W]: a per-pixel MLP over channels."""

    def __init__(self, channels=4, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        h = self.fc2(torch.nn.functional.gelu(self.fc1(x.permute(0, 2, 3, 4, 1))))
        return h.permute(0, 4, 1, 2, 3)


@pytest.mark.parametrize("tmd", [True, False])
def test_trainer_fused_weights_equal_per_call_path(tmp_path, tmd):
    results = []
    for fused in (True, False):
        qcfg = QuantConfig.from_dict({
            "method": "qvdit", "weight": {"bits": 3}, "act": {"bits": 8}, "tqe": {"rank": 4, "rank_out": 1},
            "distill": dict(enabled=True, iterations=6, lr=1e-2, lr_delta=1e-4, tmd=tmd, fused_weights=fused)})
        torch.manual_seed(0)
        teacher, student = ToyVideoModel(), ToyVideoModel()
        student.load_state_dict(teacher.state_dict())
        init_weight_quantizers(quantize_model(student, qcfg))
        result = distill(student, lambda b: teacher(**b),
                         lambda i: {"x": torch.randn(4, 4, 3, 2, 2, generator=torch.Generator().manual_seed(i))},
                         qcfg.distill, tmp_path / str(fused), progress=False)
        results.append((result["history"], {k: v.clone() for k, v in student.state_dict().items()}))
        assert all("effective_weight" not in vars(layer) for _, layer in quant_layers(student))
    (history, state), (history_ref, state_ref) = results
    assert history == history_ref
    assert all(torch.equal(state[k], state_ref[k]) for k in state_ref)


def test_per_timestep_bits_pick_their_own_weight():
    torch.manual_seed(0)
    layer = QuantLinear(torch.randn(24, 32), None, WeightQuantConfig(bits=3), None, TQEConfig(rank=4, rank_out=1),
                        step_bits=((0, 4, 3, None), (5, 9, 8, None), (10, 14, None, None)))
    layer.quant_weight = True
    for bits in layer.weight_bit_widths:
        layer.effective_weight(bits=bits)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
    x = torch.randn(5, 32)

    def run(fused):
        for p in layer.parameters():
            p.grad = None
        with weights_once(layer) if fused else torch.enable_grad():
            outputs = []
            for plan_step in (2, 7, 12, 3):  # rows of several steps in one iteration, as forward_per_step runs them
                layer.select_plan_step(plan_step)
                outputs.append(layer(x))
            torch.stack(outputs).square().sum().backward()
        return torch.stack(outputs).detach(), {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}

    (y, grads), (y_ref, grads_ref) = run(True), run(False)
    assert torch.equal(y, y_ref) and len(grads) == len(grads_ref) == 6  # A, B, a_out, b_out, Δ of each width
    for name, grad in grads_ref.items():  # a weight used twice sums its gradient first: equal up to fp32 rounding
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()), msg=name)
