"""Tests for qdiff/layers/quant_linear.py: FP exactness, TQE parity, balancing, fold, state."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qdiff.layers.quant_linear import QuantLinear
from qdiff.quantizers.config import ActQuantConfig, TQEConfig, WeightQuantConfig
from qdiff.quantizers.uniform import DynamicActQuantizer, WeightQuantizer

D_IN, D_OUT, FRAMES = 16, 12, 4


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return load_file(str(fixtures_dir / "qdiff" / "qdiff.safetensors"))


def _linear(bias=True):
    return nn.Linear(D_IN, D_OUT, bias=bias)


def _orthonormal(n):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q.float()


def _quant_on(layer):
    layer.quant_weight = layer.quant_act = True
    return layer


def _randomise_tqe(layer, scale=0.02):
    with torch.no_grad():
        for param in layer.trainable_parameters()["tqe"]:
            param.add_(torch.randn_like(param) * scale)


def _layer(tqe=TQEConfig(rank=4), num_frames=None, num_ranges=1, act=ActQuantConfig(bits=8), bits=4):
    return QuantLinear.from_linear(_linear(), WeightQuantConfig(bits=bits), act, tqe, num_frames, num_ranges)


# ----------------------------------------------------------------------------- FP path
def test_default_forward_is_exact_fp_and_weights_frozen():
    linear = _linear()
    layer = QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8), TQEConfig())
    x = torch.randn(3, 5, D_IN)
    assert torch.equal(layer(x), linear(x))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert QuantLinear.from_linear(_linear(bias=False), None, None).bias is None


# ----------------------------------------------------------------------------- TQE
def test_tqe_matches_reference_fixture(fx):
    linear = nn.Linear(48, 64)
    with torch.no_grad():
        linear.weight.copy_(fx["tqe.linear.weight"])
        linear.bias.copy_(fx["tqe.linear.bias"])
    # The reference feeds [2, 5, 48] to its dynamic quantizer, which groups token positions
    # across the batch: the fixture needs reference_token_grouping=True.
    layer = QuantLinear.from_linear(
        linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8, reference_token_grouping=True), TQEConfig()
    )
    with torch.no_grad():
        layer.lora_a.copy_(fx["tqe.loraA.weight"])
        layer.lora_b.copy_(fx["tqe.loraB.weight"])
        layer.lora_a_out.copy_(fx["tqe.loraA_out.weight"])
        layer.lora_b_out.copy_(fx["tqe.loraB_out.weight"])
    y = _quant_on(layer)(fx["tqe.x"])
    torch.testing.assert_close(y, fx["tqe.y"], rtol=0.0, atol=1e-5)
    torch.testing.assert_close(layer.weight_quantizer.delta.detach().flatten(), fx["tqe.weight_delta"], rtol=0.0, atol=1e-6)
    torch.testing.assert_close(layer.weight_quantizer.zero_point.flatten(), fx["tqe.weight_zero_point"], rtol=0.0, atol=1e-6)


def test_tqe_at_zero_init_equals_plain_quantization():
    linear = _linear()
    x = torch.randn(2, 5, D_IN)
    plain = _quant_on(QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8)))
    tqe = _quant_on(QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8), TQEConfig(rank=8)))
    assert torch.equal(tqe(x), plain(x))
    assert tqe.lora_a.shape == (8, D_IN) and tqe.lora_b.shape == (D_OUT, 8)
    assert tqe.lora_a_out.shape == (1, D_IN) and tqe.lora_b_out.shape == (D_OUT, 1)
    assert tqe.lora_a.abs().sum() > 0 and tqe.lora_b.abs().sum() == 0


def test_rank_zero_disables_terms():
    layer = _layer(tqe=TQEConfig(rank=0, rank_out=0), num_frames=FRAMES)
    assert layer.lora_a is None and layer.lora_a_out is None and layer.frame_scale is None
    assert layer.trainable_parameters()["tqe"] == []


def test_weight_quantizer_initialised_on_shifted_weight():
    layer = _layer(act=None)
    _randomise_tqe(layer, scale=0.3)
    layer.quant_weight = True
    layer(torch.randn(2, D_IN))
    reference = WeightQuantizer(WeightQuantConfig(bits=4), D_OUT, D_IN)
    reference.init_from(layer.weight + layer.lora_b.detach() @ layer.lora_a.detach())
    torch.testing.assert_close(layer.weight_quantizer.delta, reference.delta)


def test_gradients_reach_tqe_and_delta():
    layer = _quant_on(_layer(num_frames=FRAMES))
    _randomise_tqe(layer)
    layer(torch.randn(6, FRAMES, D_IN)).pow(2).sum().backward()
    groups = layer.trainable_parameters()
    assert len(groups["tqe"]) == 5 and len(groups["delta"]) == 1
    for param in groups["tqe"] + groups["delta"]:
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert layer.weight.grad is None


def test_temporal_post_term_is_applied_one_plus_m_times():
    layer = _quant_on(_layer(num_frames=FRAMES))
    _randomise_tqe(layer)
    with torch.no_grad():
        layer.frame_scale.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]).view(1, FRAMES, 1))
    x = torch.randn(5, FRAMES, D_IN)
    y = layer(x)
    x_q = layer.act_quantizer(x)
    post = layer.lora_b_out @ layer.lora_a_out
    expected = x_q @ layer.effective_weight().T + layer.bias
    expected = expected + layer.frame_scale * (x_q @ post.T)
    torch.testing.assert_close(y, expected)
    # frame 3 has m = -1: the post term cancels, leaving plain Q(W + B·A)
    plain = x_q[:, 3] @ (layer.effective_weight() - post).T + layer.bias
    torch.testing.assert_close(y[:, 3], plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temporal"):
        layer(torch.randn(5, FRAMES + 1, D_IN))


# ----------------------------------------------------------------------------- balancing
@pytest.mark.parametrize("use_scale, use_rotation", [(True, False), (False, True), (True, True)])
def test_balancing_preserves_fp_output(use_scale, use_rotation):
    linear = _linear()
    layer = QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8), TQEConfig())
    layer.set_balance(
        smooth_scale=torch.rand(D_IN) * 4 + 0.1 if use_scale else None,
        rotation=_orthonormal(D_IN) if use_rotation else None,
    )
    x = torch.randn(3, 7, D_IN)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_weight_quantizer_sees_balanced_weight():
    linear = _linear()
    x = torch.randn(3, 7, D_IN)
    plain = _quant_on(QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8)))
    smoothed = QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=8))
    scale = torch.rand(D_IN) + 0.5
    smoothed.set_balance(smooth_scale=scale)
    _quant_on(smoothed)
    assert not torch.allclose(plain(x), smoothed(x))
    torch.testing.assert_close(smoothed.balanced_weight(), linear.weight * scale)
    torch.testing.assert_close(smoothed.weight_quantizer.delta[0], _init_delta(linear.weight * scale))


def test_per_range_smoothing_selects_range():
    layer = _quant_on(_layer(tqe=None, num_ranges=2))
    scales = torch.stack([torch.ones(D_IN), torch.rand(D_IN) + 0.5])
    layer.set_balance(smooth_scale=scales)
    x = torch.randn(4, D_IN)
    layer.set_range_index(1)
    y1 = layer(x)
    assert layer.weight_quantizer.initialized.tolist() == [False, True]
    torch.testing.assert_close(layer.weight_quantizer.delta[1], _init_delta(layer.weight * scales[1]))
    layer.set_range_index(0)
    y0 = layer(x)
    torch.testing.assert_close(layer.weight_quantizer.delta[0], _init_delta(layer.weight))
    assert not torch.equal(y0, y1)
    with pytest.raises(ValueError, match="range_index"):
        layer.set_range_index(2)
    with pytest.raises(ValueError, match="smooth_scale"):
        layer.set_balance(smooth_scale=torch.ones(3, D_IN))
    with pytest.raises(ValueError, match="rotation"):
        layer.set_balance(rotation=torch.eye(D_IN + 1))


def _init_delta(weight):
    quantizer = WeightQuantizer(WeightQuantConfig(bits=4), *weight.shape)
    quantizer.init_from(weight)
    return quantizer.delta[0]


# ----------------------------------------------------------------------------- fold
@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("balance", ["none", "smooth", "smooth_rotate"])
def test_fold_equals_unfolded(temporal, balance):
    layer = _layer(num_frames=FRAMES if temporal else None)
    if balance != "none":
        layer.set_balance(
            smooth_scale=torch.rand(D_IN) + 0.5,
            rotation=_orthonormal(D_IN) if balance == "smooth_rotate" else None,
        )
    _quant_on(layer)
    _randomise_tqe(layer)
    x = torch.randn(6, FRAMES, D_IN)
    with torch.no_grad():
        expected = layer(x)
    layer.fold()
    assert layer.folded_weight.shape == (1, D_OUT, D_IN)
    assert layer.weight is None and layer.lora_a is None and layer.weight_quantizer is None
    assert list(layer.parameters()) == [layer.bias]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert "folded=True" in repr(layer)


def test_fold_keeps_every_range():
    layer = _quant_on(_layer(num_ranges=3, num_frames=FRAMES))
    layer.set_balance(smooth_scale=torch.rand(3, D_IN) + 0.5)
    _randomise_tqe(layer)
    x = torch.randn(2, FRAMES, D_IN)
    expected = []
    with torch.no_grad():
        for index in range(3):
            layer.set_range_index(index)
            expected.append(layer(x))
    layer.fold()
    assert layer.folded_weight.shape == (3, D_OUT, D_IN)
    for index in range(3):
        layer.set_range_index(index)
        torch.testing.assert_close(layer(x), expected[index], rtol=1e-5, atol=1e-5)


def test_fold_needs_quantized_weights():
    with pytest.raises(RuntimeError, match="quant_weight"):
        _layer().fold()


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_into_fresh_layer():
    rotation = _orthonormal(D_IN)
    layer = _quant_on(_layer(num_frames=FRAMES))
    layer.set_balance(smooth_scale=torch.rand(D_IN) + 0.5, rotation=rotation)
    x = torch.randn(3, FRAMES, D_IN)
    layer(x)  # initialises the weight quantizer
    _randomise_tqe(layer)
    with torch.no_grad():
        layer.weight_quantizer.delta.mul_(1.01)
    expected = layer(x)
    state = layer.state_dict()
    assert "rotation" not in state and "smooth_scale" in state and bool(state["rotate"])

    fresh = _quant_on(QuantLinear.from_linear(
        _linear(), WeightQuantConfig(bits=4), ActQuantConfig(bits=8), TQEConfig(rank=4), FRAMES
    ))
    fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="rotation"):
        fresh(x)
    fresh.set_balance(smooth_scale=fresh.smooth_scale, rotation=rotation)
    torch.testing.assert_close(fresh(x), expected, rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------- calibration helpers
def test_act_absmax_observer_momentum():
    layer = _layer()
    layer.observe_act_stats = True
    batches = [torch.randn(2, 5, D_IN) * scale for scale in (1.0, 2.0, 0.5)]
    expected = None
    for batch in batches:
        stat = batch.abs().amax(dim=-2).mean(dim=0)  # per-sample channel max, averaged
        expected = stat if expected is None else 0.95 * expected + 0.05 * stat
        layer(batch)
    torch.testing.assert_close(layer.act_absmax, expected)
    assert int(layer.act_stats_count) == 3
    layer.observe_act_stats = False
    layer(batches[0])
    torch.testing.assert_close(layer.act_absmax, expected)


def test_static_activation_mode():
    layer = QuantLinear.from_linear(_linear(), None, ActQuantConfig(bits=8, mode="static_per_tensor"), num_ranges=2)
    x = torch.randn(4, D_IN)
    layer.quant_act = True
    layer.act_quantizer.observing = True
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.act_quantizer.observing = False
    y = layer(x)
    assert not torch.equal(y, nn.functional.linear(x, layer.weight, layer.bias))
    layer.set_range_index(1)
    with pytest.raises(RuntimeError, match="calibrated"):
        layer(x)


def test_act_quantizer_kind_and_repr():
    layer = _layer(num_frames=FRAMES)
    assert isinstance(layer.act_quantizer, DynamicActQuantizer)
    text = repr(layer)
    assert "w_bits=4" in text and "a_bits=8" in text and "num_frames=4" in text
    with pytest.raises(ValueError, match="tqe"):
        QuantLinear.from_linear(_linear(), None, ActQuantConfig(), TQEConfig())


# ----------------------------------------------------------------------------- per-range statistics, per-step bits
def test_act_absmax_is_kept_per_timestep_range():
    layer = _layer(num_ranges=2)
    layer.observe_act_stats = True
    x = torch.randn(2, 5, D_IN)
    layer(x)
    layer.set_range_index(1)
    layer(2 * x)  # powers of two scale the statistic exactly
    layer(2 * x)
    stat = x.abs().amax(dim=-2).mean(dim=0)
    assert layer.act_absmax.shape == (2, D_IN) and layer.act_stats_count.tolist() == [1, 2]
    assert torch.equal(layer.act_absmax[0], stat)
    torch.testing.assert_close(layer.act_absmax[1], 2 * stat, rtol=1e-6, atol=0.0)  # momentum of two equal batches
    assert _layer().act_absmax.shape == (D_IN,)  # one range keeps the [d_in] layout of older files


def _plain(linear, w_bits, a_bits):
    weight = None if w_bits is None else WeightQuantConfig(bits=w_bits)
    act = None if a_bits is None else ActQuantConfig(bits=a_bits)
    return _quant_on(QuantLinear.from_linear(linear, weight, act))


def test_step_bits_equal_plain_layers_of_those_bits():
    linear = _linear()
    step_bits = ((0, 1, 4, 6), (2, 2, 8, 6), (3, 4, None, 8))  # plan steps (low, high, w_bits, a_bits)
    layer = _quant_on(QuantLinear.from_linear(linear, WeightQuantConfig(bits=4), ActQuantConfig(bits=6),
                                              step_bits=step_bits))
    assert layer.weight_bit_widths == (4, 8) and list(layer.step_weight_quantizers) == ["8"]
    x = torch.randn(3, 5, D_IN)
    for plan_step, bits in ((0, (4, 6)), (1, (4, 6)), (2, (8, 6)), (3, (None, 8)), (4, (None, 8))):
        layer.select_plan_step(plan_step)
        assert (layer.w_bits, layer.a_bits) == bits
        assert torch.equal(layer(x), _plain(linear, *bits)(x)), plan_step
    assert len(layer.trainable_parameters()["delta"]) == 2  # Δ of both widths train
    with pytest.raises(ValueError, match=r"plan step 5 is in no timestep range.*'4-3'"):
        layer.select_plan_step(5)
    with pytest.raises(RuntimeError, match="per-timestep bits"):
        layer.fold()
    with pytest.raises(ValueError, match="step_bits"):
        QuantLinear.from_linear(linear, None, ActQuantConfig(bits=8), step_bits=((0, 0, 4, 8),))
    assert "step_bits=[[0, 1, 4, 6]" in repr(layer)


def test_step_weight_quantizers_keep_ranges_per_width():
    layer = _quant_on(QuantLinear.from_linear(_linear(), WeightQuantConfig(bits=4), None, num_ranges=2,
                                              step_bits=((0, 0, 4, None), (1, 1, 3, None))))
    scale = torch.rand(2, D_IN) + 0.5
    layer.set_balance(smooth_scale=scale)
    for r in range(2):
        for bits in (4, 3):
            layer.effective_weight(r, bits=bits)
            expected = WeightQuantizer(WeightQuantConfig(bits=bits), D_OUT, D_IN)
            expected.init_from(layer.weight * scale[r])
            quantizer = layer.weight_quantizer if bits == 4 else layer.step_weight_quantizers["3"]
            assert torch.equal(quantizer.delta[r], expected.delta[0]) and torch.equal(quantizer.zero_point[r], expected.zero_point[0])
