"""Tests for qdiff/quantizers/uniform.py: reference parity, edge cases, STE, state."""
import pytest
import torch
from safetensors.torch import load_file

from qdiff.quantizers.config import ActQuantConfig, WeightQuantConfig
from qdiff.quantizers.uniform import (
    DynamicActQuantizer,
    StaticActQuantizer,
    WeightQuantizer,
    fake_quant,
    grid_search_lp_channelwise,
    min_max_channelwise,
    round_ste,
)

TOL = dict(rtol=0.0, atol=1e-6)


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return load_file(str(fixtures_dir / "qdiff" / "qdiff.safetensors"))


# ----------------------------------------------------------------------------- reference parity
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_grid_search_weights_match_reference(fx, bits):
    weight = fx["weight"]
    delta, zero_point = grid_search_lp_channelwise(weight, bits)
    torch.testing.assert_close(delta, fx[f"w{bits}.delta"], **TOL)
    torch.testing.assert_close(zero_point, fx[f"w{bits}.zero_point"], **TOL)

    quantizer = WeightQuantizer(WeightQuantConfig(bits=bits), *weight.shape)
    torch.testing.assert_close(quantizer(weight), fx[f"w{bits}.fake_quant"], **TOL)
    torch.testing.assert_close(quantizer.delta.detach().flatten(), fx[f"w{bits}.delta"], **TOL)
    torch.testing.assert_close(quantizer.zero_point.flatten(), fx[f"w{bits}.zero_point"], **TOL)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_dynamic_reference_grouping_matches_reference(fx, bits):
    quantizer = DynamicActQuantizer(ActQuantConfig(bits=bits, reference_token_grouping=True))
    torch.testing.assert_close(quantizer(fx["act"]), fx[f"a{bits}.fake_quant"], **TOL)


def _per_row_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent per-row asymmetric min-max fake quant, one python loop per token row."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    levels = 2**bits - 1
    for i, row in enumerate(rows):
        low, high = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        step = max((high - low) / levels, 1e-6)
        step = torch.tensor(step, dtype=x.dtype)
        zp = torch.round(-torch.tensor(low, dtype=x.dtype) / step)
        out[i] = (torch.clamp(torch.round(row / step) + zp, 0, levels) - zp) * step
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_dynamic_default_is_per_row(fx, bits):
    x = fx["act"]
    out = DynamicActQuantizer(ActQuantConfig(bits=bits))(x)
    torch.testing.assert_close(out, _per_row_reference(x, bits), rtol=0.0, atol=1e-6)
    # rows of different samples must not share a range: changing sample 1 leaves sample 0 alone
    x2 = x.clone()
    x2[1] *= 10
    out2 = DynamicActQuantizer(ActQuantConfig(bits=bits))(x2)
    torch.testing.assert_close(out2[0], out[0], rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------- error vs bits
def test_weight_error_falls_strictly_with_bits(fx):
    weight = fx["weight"]
    for init in ("grid_search_lp", "min_max"):
        errors = []
        for bits in range(2, 9):
            quantizer = WeightQuantizer(WeightQuantConfig(bits=bits, init=init), *weight.shape)
            errors.append((quantizer(weight) - weight).pow(2).sum().item())
        assert all(a > b for a, b in zip(errors, errors[1:])), (init, errors)


@pytest.mark.parametrize("symmetric", [False, True])
def test_act_error_falls_strictly_with_bits(fx, symmetric):
    x = fx["act"]
    errors = []
    for bits in range(2, 9):
        quantizer = DynamicActQuantizer(ActQuantConfig(bits=bits, symmetric=symmetric))
        errors.append((quantizer(x) - x).pow(2).sum().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_constant_and_zero_rows(bits, symmetric):
    x = torch.randn(2, 6, 16)
    x[0, 1] = 0.0  # all-zero token
    x[1, 2] = 3.5  # positive constant row
    x[1, 3] = -0.25  # negative constant row
    x[0, 4] = 1e-9  # tiny constant row, below the step floor
    out = DynamicActQuantizer(ActQuantConfig(bits=bits, symmetric=symmetric))(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 1], torch.zeros(16))
    torch.testing.assert_close(out[1, 2], x[1, 2], rtol=1e-5, atol=0.0)
    torch.testing.assert_close(out[1, 3], x[1, 3], rtol=1e-5, atol=0.0)
    assert (out[0, 4] - x[0, 4]).abs().max() <= 1e-6


def test_reference_grouping_epsilon_quirk():
    x = torch.randn(2, 3, 8)
    x[:, 1] = 0.0  # one all-zero token position: the reference then floors EVERY step to 1e-6
    out = DynamicActQuantizer(ActQuantConfig(bits=8, reference_token_grouping=True))(x)
    assert torch.isfinite(out).all()
    # with Δ = 1e-6 every token position collapses to a 255e-6-wide window above its minimum
    for token in (0, 2):
        assert out[:, token].max() - out[:, token].min() <= 255e-6 + 1e-6
        assert (out[:, token] - x[:, token]).abs().max() > 0.1
    with pytest.raises(ValueError, match="B, N, C"):
        DynamicActQuantizer(ActQuantConfig(reference_token_grouping=True))(torch.randn(4, 8))


def test_zero_weight_row_is_exact():
    weight = torch.randn(4, 16)
    weight[2] = 0.0
    quantizer = WeightQuantizer(WeightQuantConfig(bits=4), 4, 16)
    out = quantizer(weight)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(16))


# ----------------------------------------------------------------------------- STE and grids
def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0, -2.0]))
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quant_gradients_reach_x_and_delta():
    x = torch.randn(4, 8, requires_grad=True)
    delta = torch.full((4, 1), 0.05, requires_grad=True)
    zero_point = torch.full((4, 1), 8.0)
    fake_quant(x, delta, zero_point, 4).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert delta.grad.abs().sum() > 0


def test_weight_quantizer_delta_is_trainable_and_zero_point_fixed():
    weight = torch.randn(8, 16)
    quantizer = WeightQuantizer(WeightQuantConfig(bits=4), 8, 16)
    quantizer(weight).pow(2).sum().backward()
    assert isinstance(quantizer.delta, torch.nn.Parameter) and quantizer.delta.grad.abs().sum() > 0
    assert "zero_point" in dict(quantizer.named_buffers())
    frozen = WeightQuantizer(WeightQuantConfig(bits=4, learnable_delta=False), 8, 16)
    assert not frozen.delta.requires_grad


@pytest.mark.parametrize("bits", [3, 4])
def test_outputs_lie_on_grid(bits):
    weight = torch.randn(8, 32)
    for symmetric in (False, True):
        quantizer = WeightQuantizer(WeightQuantConfig(bits=bits, symmetric=symmetric, init="min_max"), 8, 32)
        with torch.no_grad():
            levels = quantizer(weight) / quantizer.delta[0, :, 0] + quantizer.zero_point[0, :, 0]
        torch.testing.assert_close(levels, levels.round(), rtol=0.0, atol=1e-4)
        levels = levels.round()
        if symmetric:
            assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= 2 ** (bits - 1) - 1
            assert torch.count_nonzero(quantizer.zero_point) == 0
        else:
            assert levels.min() >= 0 and levels.max() <= 2**bits - 1


def test_min_max_channelwise_covers_range():
    weight = torch.randn(5, 12)
    delta, zero_point = min_max_channelwise(weight, 8)
    torch.testing.assert_close(delta, (weight.amax(1).clamp(min=0) - weight.amin(1).clamp(max=0)) / 255)
    assert torch.equal(zero_point, zero_point.round())


def test_group_wise_matches_per_group_search():
    weight = torch.randn(6, 32)
    quantizer = WeightQuantizer(WeightQuantConfig(bits=3, group_size=8), 6, 32)
    out = quantizer(weight)
    delta, zero_point = grid_search_lp_channelwise(weight.reshape(24, 8), 3)
    assert quantizer.delta.shape == (1, 6, 4, 1)
    torch.testing.assert_close(quantizer.delta.detach().flatten(), delta)
    expected = fake_quant(weight.reshape(24, 8), delta[:, None], zero_point[:, None], 3).reshape(6, 32)
    torch.testing.assert_close(out, expected)
    # finer groups never do worse than per-channel ranges
    per_channel = WeightQuantizer(WeightQuantConfig(bits=3), 6, 32)(weight)
    assert (out - weight).pow(2).sum() < (per_channel - weight).pow(2).sum()
    with pytest.raises(ValueError, match="group_size"):
        WeightQuantizer(WeightQuantConfig(group_size=5), 6, 32)


def test_per_range_parameters_and_state_dict_round_trip():
    weight = torch.randn(8, 16)
    quantizer = WeightQuantizer(WeightQuantConfig(bits=4), 8, 16, num_ranges=3)
    out0 = quantizer(weight, range_index=0)
    out2 = quantizer(2.0 * weight, range_index=2)
    assert quantizer.initialized.tolist() == [True, False, True]
    torch.testing.assert_close(quantizer.delta[2], 2.0 * quantizer.delta[0])
    fresh = WeightQuantizer(WeightQuantConfig(bits=4), 8, 16, num_ranges=3)
    fresh.load_state_dict(quantizer.state_dict())
    torch.testing.assert_close(fresh(weight, range_index=0), out0, rtol=0.0, atol=0.0)
    # range 2 was loaded, so it is not re-initialised from a different weight
    torch.testing.assert_close(fresh(2.0 * weight + 0.1, range_index=2), quantizer(2.0 * weight + 0.1, range_index=2))
    assert not torch.equal(fresh(2.0 * weight, range_index=2), out0)
    assert torch.equal(fresh(2.0 * weight, range_index=2), out2)


def test_static_act_quantizer_observes_then_quantizes():
    quantizer = StaticActQuantizer(ActQuantConfig(bits=8, mode="static_per_tensor"), num_ranges=2)
    with pytest.raises(RuntimeError, match="never calibrated"):
        quantizer(torch.randn(3, 4))
    quantizer.observing = True
    batches = [torch.randn(2, 5, 16) * scale for scale in (1.0, 3.0)]
    for batch in batches:
        assert quantizer(batch, range_index=1) is batch
    quantizer.observing = False
    stacked = torch.cat(batches)
    assert quantizer.x_min[1] == stacked.min() and quantizer.x_max[1] == stacked.max()
    assert quantizer.observed.tolist() == [False, True]
    out = quantizer(batches[1], range_index=1)
    step = (stacked.max() - stacked.min()) / 255
    assert (out - batches[1]).abs().max() <= step / 2 + 1e-6
    with pytest.raises(ValueError, match="mode"):
        StaticActQuantizer(ActQuantConfig())
    with pytest.raises(ValueError, match="mode"):
        DynamicActQuantizer(ActQuantConfig(mode="static_per_tensor"))


@pytest.mark.parametrize("mode", ["dynamic_per_token", "static_per_tensor"])
def test_act_bits_chosen_per_call_equal_a_quantizer_of_those_bits(mode):
    x = torch.randn(3, 5, 16)
    quantizers = {}
    for bits in (8, 4):
        cfg = ActQuantConfig(bits=bits, mode=mode)
        quantizers[bits] = DynamicActQuantizer(cfg) if mode == "dynamic_per_token" else StaticActQuantizer(cfg)
        if mode == "static_per_tensor":
            quantizers[bits].observe(x)
    eight, four = quantizers[8], quantizers[4]
    assert torch.equal(eight(x, 0, bits=4), four(x)) and torch.equal(eight(x, 0), eight(x, 0, bits=8))
    assert not torch.equal(eight(x, 0, bits=4), eight(x))
