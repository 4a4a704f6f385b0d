"""FP8 (e4m3) fake quantization (qdiff/kernels/fp8_quant.py, FP8ActQuantizer, WeightQuantizer with format fp8_e4m3)
and its config keys: hand-computed values, saturation, signed zeros, per-token scales, STE gradients, errors."""
import dataclasses

import pytest
import torch

from qdiff.config import ConfigError, QuantConfig
from qdiff.kernels.fp8_quant import (
    FP8_MAX,
    exact_in_e4m3,
    fake_quant_fp8,
    fake_quant_fp8_per_token,
    fp8_row_scale,
    quantize_fp8_per_token,
    to_fp8,
)
from qdiff.layers import QuantLinear
from qdiff.quantizers import FP8ActQuantizer, WeightQuantizer
from qdiff.quantizers.config import ActQuantConfig, WeightQuantConfig

FP8_ACT = ActQuantConfig(format="fp8_e4m3")
FP8_WEIGHT = WeightQuantConfig(format="fp8_e4m3")

# One token row with absmax 448, so its scale is exactly 1 and x / s = x: (input, its e4m3 value) worked out by hand.
# e4m3: 3 mantissa bits, exponent bias 7; [1, 2) in steps of 1/8, [16, 32) in steps of 2, subnormals k·2^-9.
HAND = [
    (448.0, 448.0),  # the largest finite e4m3 value
    (-1.0625, -1.0),  # halfway between 1 (mantissa 000) and 1.125 (001): ties to even
    (1.1875, 1.25),  # halfway between 1.125 (001) and 1.25 (010): ties to even
    (17.0, 16.0),  # halfway between 16 and 18: ties to even (16)
    (19.0, 20.0),  # halfway between 18 (001) and 20 (010)
    (0.3, 0.3125),  # [0.25, 0.5) in steps of 1/32: 9.6 steps -> 10
    (0.001, 2.0**-9),  # the smallest subnormal is nearer than 0
    (2.0**-10, 0.0),  # halfway between 0 and 2^-9: ties to even (0)
    (-3 * 2.0**-10, -2.0**-8),  # halfway between 2^-9 and 2·2^-9: ties to even (2·2^-9)
    (240.0, 240.0),  # exact
    (232.0, 224.0),  # [128, 256) in steps of 16: halfway between 224 (110) and 240 (111): ties to even
]


def test_hand_values_one_row():
    x = torch.tensor([[v for v, _ in HAND]])
    expected = torch.tensor([[e for _, e in HAND]])
    assert float(fp8_row_scale(x)) == 1.0
    codes, scale = quantize_fp8_per_token(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (1, 1) and float(scale) == 1.0
    assert torch.equal(codes.float(), expected)
    assert torch.equal(fake_quant_fp8_per_token(x), expected)
    assert torch.equal(FP8ActQuantizer(FP8_ACT)(x), expected)


def test_per_token_scales_are_independent():
    row = torch.tensor([7.0, -3.5, 1.0, 0.1, 0.0, 2.0**-5])
    # absmax 7 -> s = 7/448 = 1/64 exactly; the second row is the first times 8 (s = 1/8), the third times 1/1024
    x = torch.stack([row, row * 8, row / 1024])
    scale = fp8_row_scale(x)
    assert torch.equal(scale[:, 0], torch.tensor([1 / 64, 1 / 8, 1 / 65536]))
    out = fake_quant_fp8_per_token(x)
    by_hand = torch.tensor([7.0, -3.5, 1.0, 0.1015625, 0.0, 2.0**-5])  # 0.1·64 = 6.4 -> 6.5 (steps of 0.5 in [4, 8))
    assert torch.equal(out, torch.stack([by_hand, by_hand * 8, by_hand / 1024]))
    codes, _ = quantize_fp8_per_token(x)
    assert torch.equal(codes[0].float(), codes[1].float()) and torch.equal(codes[0].float(), codes[2].float())
    assert float(codes[0, 0].float()) == FP8_MAX  # each row's absmax lands on 448


def test_all_zero_row_and_negative_zero():
    x = torch.tensor([[0.0, -0.0, 0.0], [-0.0, 2.0, -1.0]])
    out = fake_quant_fp8_per_token(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, -1.0]]))
    assert torch.equal(torch.signbit(out), torch.signbit(x))  # −0.0 stays −0.0 (and 0.0 stays 0.0)
    assert float(fp8_row_scale(x)[0]) == pytest.approx(1e-12 / 448)  # the floor, not a division by zero


def test_saturation_clamps_before_the_cast():
    scale = torch.tensor(1.0)
    x = torch.tensor([500.0, -1e6, 464.0, 449.0, float(2**20)])
    assert torch.equal(to_fp8(x, scale).float(), torch.tensor([448.0, -448.0, 448.0, 448.0, 448.0]))
    assert torch.equal(fake_quant_fp8(x, scale), torch.tensor([448.0, -448.0, 448.0, 448.0, 448.0]))


def test_dtype_and_shape_follow_the_input():
    x = torch.randn(2, 3, 40).bfloat16()
    out = fake_quant_fp8_per_token(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    manual = (to_fp8(x.float(), fp8_row_scale(x.float())).float() * fp8_row_scale(x.float())).bfloat16()
    assert torch.equal(out, manual)


def test_relative_error_is_that_of_three_mantissa_bits():
    x = torch.randn(64, 256)
    out = fake_quant_fp8_per_token(x)
    assert float((out - x).norm() / x.norm()) < 0.04  # rounding to 4 significant bits: ~2^-5 relative
    assert float((out - x).norm() / x.norm()) > 0.005


def test_straight_through_gradients():
    x = torch.tensor([[1.1, -0.3, 448.0, 100.0]], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    out = fake_quant_fp8(x, scale)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity inside the range (448 is its edge, included)
    q = torch.tensor([1.125, -0.3125, 448.0, 96.0])
    assert float(scale.grad) == pytest.approx(float((q - x.detach()[0]).sum()), abs=1e-4)  # Σ (q − x/s)

    outside = torch.tensor([1000.0], requires_grad=True)
    fake_quant_fp8(outside, torch.tensor(1.0)).sum().backward()
    assert float(outside.grad) == 0.0  # saturated: no gradient, as the integer clamp

    act = torch.randn(3, 16, requires_grad=True)
    FP8ActQuantizer(FP8_ACT)(act).pow(2).sum().backward()
    assert act.grad is not None and torch.isfinite(act.grad).all() and act.grad.abs().sum() > 0


def test_weight_quantizer_fp8_init_forward_and_learnable_scale():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    w[3] = 0.0  # an all-zero output channel
    quantizer = WeightQuantizer(FP8_WEIGHT, 6, 32)
    out = quantizer(w)
    absmax = w.abs().amax(dim=1).clamp(min=1e-12)
    assert torch.equal(quantizer.delta.detach().flatten(), absmax / 448)
    assert torch.equal(quantizer.zero_point, torch.zeros_like(quantizer.zero_point))
    expected = (w / (absmax / 448)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (absmax / 448)[:, None]
    assert torch.equal(out, expected) and torch.equal(out[3], torch.zeros(32))
    assert quantizer.delta.requires_grad  # learnable_delta (default True): straight-through scale
    quantizer(w).pow(2).sum().backward()
    assert quantizer.delta.grad is not None and torch.count_nonzero(quantizer.delta.grad) > 0
    frozen = WeightQuantizer(dataclasses.replace(FP8_WEIGHT, learnable_delta=False), 6, 32)
    assert not frozen.delta.requires_grad


def test_quant_linear_picks_the_fp8_quantizers():
    layer = QuantLinear(torch.randn(8, 16), None, WeightQuantConfig(bits=4, format_8bit="fp8_e4m3"), FP8_ACT,
                        step_bits=((0, 1, 8, 8), (2, 3, 4, 8)))
    assert isinstance(layer.act_quantizer, FP8ActQuantizer)
    assert not layer.weight_quantizer.fp8  # 4 bits: the integer grid
    assert layer.step_weight_quantizers["8"].fp8  # the 8-bit steps: FP8 (format_8bit)
    layer.quant_weight = layer.quant_act = True
    x = torch.randn(5, 16)
    assert torch.isfinite(layer(x)).all()
    with pytest.raises(ValueError, match="8-bit"):
        layer.act_quantizer(x, bits=6)
    assert "a_format=fp8_e4m3" in repr(layer)


def test_exact_integers():
    ints = torch.arange(-16, 17, dtype=torch.float32)
    assert torch.equal(ints.to(torch.float8_e4m3fn).float(), ints)
    assert float(torch.tensor(17.0).to(torch.float8_e4m3fn).float()) != 17.0
    assert exact_in_e4m3(4, False) and exact_in_e4m3(3, False) and exact_in_e4m3(5, True)
    assert not exact_in_e4m3(5, False) and not exact_in_e4m3(8, False) and not exact_in_e4m3(6, True)


# ----------------------------------------------------------------------------- config keys
def test_config_defaults_are_omitted_from_dicts():
    # files written before the format keys existed compare equal: the keys appear only when not default
    assert "format" not in WeightQuantConfig().to_dict() and "format_8bit" not in WeightQuantConfig().to_dict()
    assert "format" not in ActQuantConfig().to_dict()
    for cfg in (FP8_WEIGHT, WeightQuantConfig(bits=4, format_8bit="fp8_e4m3"), FP8_ACT):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert FP8_ACT.to_dict()["format"] == "fp8_e4m3"


def test_quant_format_follows_the_width():
    mixed = WeightQuantConfig(bits=4, format_8bit="fp8_e4m3")
    assert mixed.quant_format == "int"
    assert dataclasses.replace(mixed, bits=8).quant_format == "fp8_e4m3"
    assert dataclasses.replace(mixed, bits=3).quant_format == "int"
    assert FP8_WEIGHT.quant_format == "fp8_e4m3" and WeightQuantConfig().quant_format == "int"


@pytest.mark.parametrize("cls, kwargs, match", [
    (ActQuantConfig, {"format": "fp8_e4m3", "bits": 6}, "bits: format 'fp8_e4m3' activations are 8-bit"),
    (ActQuantConfig, {"format": "fp8_e4m3", "mode": "static_per_tensor"}, "supports 'dynamic_per_token' only"),
    (ActQuantConfig, {"format": "fp8_e4m3", "reference_token_grouping": True}, "reference_token_grouping"),
    (ActQuantConfig, {"format": "fp8_e5m2"}, "format: must be one of"),
    (WeightQuantConfig, {"format": "fp8_e4m3", "bits": 4}, "format_8bit: fp8_e4m3"),
    (WeightQuantConfig, {"format": "fp8_e4m3", "group_size": 64}, "one scale per output channel"),
    (WeightQuantConfig, {"bits": 4, "format_8bit": "fp8_e4m3", "group_size": 64}, "one scale per output channel"),
    (WeightQuantConfig, {"format": "fp8_e4m3", "format_8bit": "int"}, "contradicts"),
    (WeightQuantConfig, {"format": "float8"}, "format: must be one of"),
    (WeightQuantConfig, {"format_8bit": "e4m3"}, "format_8bit: must be one of"),
])
def test_config_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_quant_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"act\.bits: format 'fp8_e4m3' activations are 8-bit"):
        QuantConfig.from_dict({"act": {"format": "fp8_e4m3", "bits": 6}})
    with pytest.raises(ConfigError, match=r"act\.mode: format 'fp8_e4m3' supports"):
        QuantConfig.from_dict({"act": {"format": "fp8_e4m3", "mode": "static_per_tensor"}})
    base = {"weight": {"format": "fp8_e4m3"},
            "mixed_precision": {"weight_bits_file": "configs/quant/mixed_precision/weight_8_mlp.yaml",
                                "weight_bits_apply_below": 8}}
    with pytest.raises(ConfigError, match="weight.format 'fp8_e4m3' is 8-bit only"):
        QuantConfig.from_dict(base)
    with pytest.raises(ConfigError, match="act.format 'fp8_e4m3' is 8-bit only"):
        QuantConfig.from_dict({"act": {"format": "fp8_e4m3"},
                               "mixed_precision": {"act_bits_file": "configs/quant/mixed_precision/act_8_mlp.yaml",
                                                   "act_bits_apply_below": 8}})
    # the shipped maps do not apply at 8 bits (threshold 4 / 6), so FP8 configs may name them
    QuantConfig.from_dict({**base, "mixed_precision": {**base["mixed_precision"], "weight_bits_apply_below": 4}})


def test_shipped_fp8_configs():
    w8 = QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml")
    assert (w8.weight.quant_format, w8.act.format, w8.balance.method) == ("fp8_e4m3", "fp8_e4m3", "none")
    assert w8.resolve_bits("blocks.0.attn.q") == (8, 8)
    w4 = QuantConfig.from_yaml("configs/quant/w4a8_fp8.yaml")
    assert w4.act.format == "fp8_e4m3" and w4.weight.quant_format == "int"
    assert w4.resolve_bits("blocks.0.attn.q") == (4, 8) and w4.resolve_bits("blocks.0.mlp.fc1") == (8, 8)
    assert dataclasses.replace(w4.weight, bits=w4.resolve_bits("blocks.0.mlp.fc1")[0]).quant_format == "fp8_e4m3"
