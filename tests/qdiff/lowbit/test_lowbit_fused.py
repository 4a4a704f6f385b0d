"""Fused producers (qdiff.lowbit.fused): IntLinear layers fed a QuantizedInput give what they give on the eager
activation (CPU torch path), readers are grouped into as few quantization launches as possible, and layers that
cannot take a fused input are refused (the caller falls back to the eager ops)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.lowbit import IntLinear, QuantizedInput, fused, quantize_gelu, quantize_layernorm_modulate, set_fusion
from t2v.models.embeddings import t2i_modulate


def sibling(name: str):
    """A test module beside this one, for its helpers (pytest's importlib mode has no package imports)."""
    spec = importlib.util.spec_from_file_location(f"lowbit_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = sibling("test_lowbit_int_linear")
WIDTH = 48


def readers(count=3, **kwargs):
    torch.manual_seed(0)
    layers = [IntLinear.from_quant_linear(helpers.quant_linear(d_in=WIDTH, **kwargs), backend="torch")
              for _ in range(count)]
    for layer in layers:
        set_fusion(layer, True)
    return layers


def modulation(batch=2, tokens=13):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, WIDTH, generator=gen) * torch.linspace(0.2, 4, WIDTH)
    return x, torch.randn(batch, 1, WIDTH, generator=gen), torch.randn(batch, 1, WIDTH, generator=gen) * 0.3


@pytest.fixture
def launches(monkeypatch):
    """Counts the quantization launches of the fused helpers."""
    calls = []
    original, original_residual = fused.quantize_per_token, fused.quantize_per_token_residual

    def counting(*args, **kwargs):
        calls.append(kwargs["producer"].kind)
        return original(*args, **kwargs)

    def counting_residual(*args, **kwargs):  # ("residual", producer kind or 0): the residual step in front
        calls.append(("residual", 0 if kwargs["producer"] is None else kwargs["producer"].kind))
        return original_residual(*args, **kwargs)

    monkeypatch.setattr(fused, "quantize_per_token", counting)
    monkeypatch.setattr(fused, "quantize_per_token_residual", counting_residual)
    return calls


@pytest.mark.parametrize("smooth,a_bits,static", [(False, 8, False), (True, 6, False), (False, 8, True)])
def test_layernorm_modulate_input_equals_eager(launches, smooth, a_bits, static):
    layers = readers(smooth=smooth, rotation=None, a_bits=a_bits, static=static)
    x, shift, scale = modulation()
    norm = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)
    quantized = quantize_layernorm_modulate(x, norm, shift, scale, *layers)
    assert isinstance(quantized, QuantizedInput) and quantized.shape == x.shape and quantized.dtype == x.dtype
    assert len(launches) == (3 if smooth or static else 1)  # one launch per distinct grid (own s, own static range)
    eager = t2i_modulate(norm(x), shift, scale)
    with torch.no_grad():
        for layer in layers:
            out, ref = layer(quantized), layer(eager)
            assert out.shape == ref.shape == (2, 13, 40)
            assert float((out - ref).norm() / ref.norm()) < 1e-6
            # a reshaped QuantizedInput gives the reshaped output (the block's "B (T S) C -> (B T) S C")
            torch.testing.assert_close(layer(quantized.reshape(26, WIDTH)), out.reshape(26, 40), rtol=0, atol=0)


def test_gelu_input_equals_eager(launches):
    layers = readers(count=1, smooth=True, rotation=None)
    h = torch.randn(37, WIDTH) * 3
    quantized = quantize_gelu(h, nn.GELU(approximate="tanh"), *layers)
    assert launches == [2]
    with torch.no_grad():
        out, ref = layers[0](quantized), layers[0](nn.functional.gelu(h, approximate="tanh"))
    assert float((out - ref).norm() / ref.norm()) < 1e-6
    assert quantize_gelu(h, nn.GELU(), *layers) is None  # the erf GELU is not fused


def test_unfusable_readers_are_refused():
    x, shift, scale = modulation()
    norm = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)
    plain = readers(count=1, smooth=False, rotation=None)
    cases = {
        "rotation": readers(count=1, smooth=True, rotation="hadamard"),
        "per-frame TQE factor": readers(count=1, smooth=False, rotation=None, temporal=True),
        "nn.Linear": [nn.Linear(WIDTH, 8)],
        "mixed backends": plain + [readers(count=1, smooth=False, rotation=None)[0]],
    }
    cases["mixed backends"][1].backend = "auto"
    for name, layers in cases.items():
        assert quantize_layernorm_modulate(x, norm, shift, scale, *layers) is None, name
    assert quantize_layernorm_modulate(x, nn.LayerNorm(WIDTH), shift, scale, *plain) is None  # affine LayerNorm
    assert quantize_layernorm_modulate(x, norm, shift.double(), scale, *plain) is None  # dtype promotion
    set_fusion(plain[0], False)
    assert quantize_layernorm_modulate(x, norm, shift, scale, *plain) is None
    set_fusion(plain[0], True)
    quantized = quantize_layernorm_modulate(x, norm, shift, scale, *plain)
    other = readers(count=1, smooth=False, rotation=None)[0]
    with pytest.raises(ValueError, match="not quantized for this layer"):
        other(quantized)


@pytest.mark.parametrize("yaml,expected", [
    # per block: q/k/v share one launch; cross q after the temporal residual add; fc1's norm2 + modulate (integer
    # readers: the cross residual add stays apart, see quantize_residual); fc2's GELU
    ("configs/quant/w4a6_qvdit.yaml", {1: 2 * 2, ("residual", 0): 2, 2: 2}),
    ("configs/quant/w4a8_qvdit.yaml", {1: 2 * 4, ("residual", 0): 2, 2: 2}),  # smoothing: q, k, v
])
def test_stdit_block_uses_fused_producers(launches, yaml, expected):
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int

    model_helpers = sibling("test_lowbit_model")
    _, model = model_helpers.calibrated(apply_overrides(QuantConfig.from_yaml(yaml), ["distill.enabled=false"]))
    convert_to_int(model, backend="torch")
    x, t, y, mask = model_helpers.inputs()
    with torch.no_grad():
        unfused = model(x, t, y, mask=mask)
    assert not launches  # fusion is opt-in
    set_fusion(model, True)
    with torch.no_grad():
        out = model(x, t, y, mask=mask)
    assert {kind: launches.count(kind) for kind in set(launches)} == expected
    # CPU: the references run the eager ops, so the same codes; a shared launch forms the readers' TQE projections
    # with their A_out stacked (another summation order than each reader's own): equal up to float rounding
    assert float((out - unfused).norm() / unfused.norm()) < 1e-7
