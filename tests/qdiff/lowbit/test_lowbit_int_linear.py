"""IntLinear equals the fake-quant QuantLinear it was made from (float32), on the torch (CPU) path."""
import pytest
import torch
from torch import nn

from qdiff.balancing import hadamard, random_hadamard
from qdiff.layers import QuantLinear
from qdiff.lowbit import IntExportError, IntLinear, SharedInputQuant
from qdiff.quantizers import ActQuantConfig, TQEConfig, WeightQuantConfig

FRAMES = 4


def quant_linear(d_in=48, d_out=40, w_bits=4, a_bits=8, temporal=False, smooth=True, rotation="hadamard",
                 w_symmetric=False, a_symmetric=False, static=False, tqe=True, bias=True):
    """A calibrated-looking QuantLinear: non-zero TQE terms and frame weights, balancing installed."""
    linear = nn.Linear(d_in, d_out, bias=bias)
    act_cfg = ActQuantConfig(bits=a_bits, symmetric=a_symmetric, mode="static_per_tensor" if static else "dynamic_per_token")
    layer = QuantLinear.from_linear(linear, WeightQuantConfig(bits=w_bits, symmetric=w_symmetric), act_cfg,
                                    TQEConfig(rank=4, rank_out=1) if tqe else None,
                                    num_frames=FRAMES if temporal else None)
    rot = {"hadamard": lambda: hadamard(d_in), "random": lambda: random_hadamard(d_in, seed=3), None: lambda: None}[rotation]()
    layer.set_balance(torch.rand(d_in) + 0.5 if smooth else None, rot)
    with torch.no_grad():
        if tqe:
            layer.lora_b.normal_(0, 0.01)
            layer.lora_b_out.normal_(0, 0.01)
        if layer.frame_scale is not None:
            layer.frame_scale.normal_(0, 0.5)
        layer.quant_weight = layer.quant_act = True
        layer.effective_weight()  # initialise the weight range (grid search on W' + B·A), as calibration does
        if static:
            layer.act_quantizer.observing = True
            layer(sample_input(64, d_in, temporal))
            layer.act_quantizer.observing = False
    return layer


def sample_input(rows, d_in, temporal):
    x = torch.randn(rows, FRAMES, d_in) if temporal else torch.randn(rows, d_in)
    return x * torch.linspace(0.2, 4, d_in)  # some channels with outliers


def relative_error(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 6), (3, 6)])
@pytest.mark.parametrize("temporal", [False, True])
def test_matches_fake_quant_with_tqe_smoothing_rotation(w_bits, a_bits, temporal):
    layer = quant_linear(w_bits=w_bits, a_bits=a_bits, temporal=temporal)
    int_layer = IntLinear.from_quant_linear(layer)
    assert int_layer.container == ("int4x2" if w_bits <= 4 else "int8")
    for rows in (1, 13, 37):  # ragged M
        x = sample_input(rows, 48, temporal)
        with torch.no_grad():
            ref, out = layer(x), int_layer(x)
        assert out.shape == ref.shape and out.dtype == x.dtype
        assert relative_error(out, ref) < 2e-6
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(w_symmetric=True, a_symmetric=True),
    dict(w_symmetric=True),
    dict(static=True, w_bits=8),
    dict(d_in=33, d_out=20, rotation=None),  # odd K in the 4-bit container
    dict(rotation="random", smooth=False),
    dict(tqe=False, smooth=False, rotation=None, bias=False),
])
def test_matches_fake_quant_other_grids(kwargs):
    layer = quant_linear(**kwargs)
    int_layer = IntLinear.from_quant_linear(layer)
    x = sample_input(29, layer.in_features, False)
    with torch.no_grad():
        ref, out = layer(x), int_layer(x)
    assert relative_error(out, ref) < 2e-6


def test_weight_codes_are_the_fake_quant_grid():
    layer = quant_linear(w_bits=3, a_bits=6)
    int_layer = IntLinear.from_quant_linear(layer)
    codes = int_layer.weight_codes()
    assert codes.min() >= -4 and codes.max() <= 3  # 3-bit grid inside the 4-bit container
    with torch.no_grad():
        fake = layer.weight_quantizer(layer.balanced_weight() + layer.lora_b @ layer.lora_a)
    assert torch.equal(int_layer.dequantized_weight(), fake)


def test_bf16_input_gives_bf16_output():
    layer = quant_linear(w_bits=8)
    int_layer = IntLinear.from_quant_linear(layer)
    x = sample_input(9, 48, False)
    with torch.no_grad():
        ref, out = layer(x), int_layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), ref) < 2e-2


def test_weight_bytes_shrink():
    bytes_8 = IntLinear.from_quant_linear(quant_linear(d_in=64, d_out=64, w_bits=8, smooth=False, rotation=None)).weight_bytes()
    bytes_4 = IntLinear.from_quant_linear(quant_linear(d_in=64, d_out=64, w_bits=4, smooth=False, rotation=None)).weight_bytes()
    assert bytes_4 < bytes_8 < 64 * 64 * 2


def test_refusals():
    layer = quant_linear()
    layer.fold()
    with pytest.raises(IntExportError, match="folded"):
        IntLinear.from_quant_linear(layer)
    w_only = QuantLinear.from_linear(nn.Linear(8, 8), WeightQuantConfig(bits=8), None)
    with pytest.raises(IntExportError, match="activations stay in floating point"):
        IntLinear.from_quant_linear(w_only)
    grouped = QuantLinear.from_linear(nn.Linear(8, 8), WeightQuantConfig(bits=8, group_size=4), ActQuantConfig(bits=8))
    with pytest.raises(IntExportError, match="group_size=4"):
        IntLinear.from_quant_linear(grouped)
    fresh = QuantLinear.from_linear(nn.Linear(8, 8), WeightQuantConfig(bits=8), ActQuantConfig(bits=8))
    with pytest.raises(IntExportError, match="never initialised"):
        IntLinear.from_quant_linear(fresh)
    temporal = IntLinear.from_quant_linear(quant_linear(temporal=True))
    with pytest.raises(ValueError, match="temporal layer expects"):
        temporal(torch.randn(3, FRAMES + 1, 48))


def test_dtype_casts_keep_float32_scales():
    int_layer = IntLinear.from_quant_linear(quant_linear(temporal=True))
    before = {k: v.clone() for k, v in int_layer.state_dict().items()}
    model = nn.Sequential(int_layer).to(torch.bfloat16)
    after = model[0].state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert model[0].rotation.dtype == torch.float32


def test_shared_input_memo():
    layers = [IntLinear.from_quant_linear(quant_linear(smooth=False, rotation=None)) for _ in range(3)]
    memo = SharedInputQuant()
    for layer in layers:
        layer.input_memo = memo
    x = sample_input(11, 48, False)
    expected = []
    for layer in layers:
        layer.input_memo = None
        expected.append(layer(x))
        layer.input_memo = memo
    outputs = [layer(x) for layer in layers]
    assert memo.hits == 2
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # each layer keeps its own TQE projection
    x.mul_(2)  # an in-place write: the memo must not serve the old codes
    layers[0](x)
    assert memo.hits == 2
    layers[1](x.clone())  # equal values, another tensor: recomputed
    assert memo.hits == 2
    with torch.inference_mode():  # no version counter: computed every time, never served stale
        frozen = sample_input(11, 48, False)
        first = layers[0](frozen)
        frozen.mul_(3)
        torch.testing.assert_close(layers[1](frozen), expected_for(layers[1], frozen))
        assert memo.hits == 2 and first.shape == (11, 40)


def expected_for(layer, x):
    memo, layer.input_memo = layer.input_memo, None
    try:
        return layer(x)
    finally:
        layer.input_memo = memo
