"""FP8Linear (qdiff/lowbit/fp8_linear.py): equals the fake-quant QuantLinear with FP8 activations (W8 FP8 weights and
≤ 4-bit integer weights), the GEMM dispatch and its fallback, exactness of integer codes in e4m3, export -> load round
trips, and the refusals."""
import copy
import dataclasses

import pytest
import torch
from safetensors import safe_open
from torch import nn

from qdiff.adapters import ModelAdapter
from qdiff.api import calibrate_balancing, init_weight_quantizers, quantize_model, set_quant_state
from qdiff.balancing import hadamard
from qdiff.config import QuantConfig
from qdiff.layers import QuantLinear
from qdiff.lowbit import (
    FP8Linear,
    IntExportError,
    IntLinear,
    IntWeightsError,
    convert_to_int,
    export_int_model,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_layers,
    int_weight_bytes,
    load_int_model,
    read_int_header,
    set_int_backend,
)
from qdiff.lowbit import fp8_linear
from qdiff.lowbit.pack import unpack_codes
from qdiff.quantizers.config import ActQuantConfig, TQEConfig, WeightQuantConfig

FP8_ACT = ActQuantConfig(format="fp8_e4m3")
T = 4


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def quant_linear(weight_cfg, k=64, n=48, tqe=False, frames=None, smooth=False, rotate=False, seed=0):
    """A calibrated-looking QuantLinear with FP8 activations (random TQE terms, smoothing, rotation)."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear(torch.randn(n, k, generator=gen) * 0.05, torch.randn(n, generator=gen), weight_cfg, FP8_ACT,
                        tqe=TQEConfig(rank=4, rank_out=1) if tqe else None, num_frames=frames)
    if smooth or rotate:
        layer.set_balance(smooth_scale=torch.rand(k, generator=gen) + 0.5 if smooth else None,
                          rotation=hadamard(k) if rotate else None)
    with torch.no_grad():
        if tqe:
            layer.lora_b.normal_(0, 1e-2, generator=gen)
            layer.lora_b_out.normal_(0, 1e-2, generator=gen)
        if layer.frame_scale is not None:
            layer.frame_scale.normal_(0, 0.5, generator=gen)
        layer.effective_weight()  # initialises the weight quantizer on W' + B·A, as calibration does
    layer.quant_weight = layer.quant_act = True
    return layer


WEIGHTS = {
    "w8_fp8": WeightQuantConfig(format="fp8_e4m3"),
    "w4_affine": WeightQuantConfig(bits=4),
    "w4_symmetric": WeightQuantConfig(bits=4, symmetric=True, init="min_max"),
    "w3_affine": WeightQuantConfig(bits=3, init="min_max"),
    "w5_symmetric": WeightQuantConfig(bits=5, symmetric=True),
    "w8_via_format_8bit": dataclasses.replace(WeightQuantConfig(bits=4, format_8bit="fp8_e4m3"), bits=8),
}
LAYOUTS = {
    "plain": dict(),
    "tqe_temporal": dict(tqe=True, frames=T),
    "smooth": dict(smooth=True),
    "smooth_rotate_tqe": dict(smooth=True, rotate=True, tqe=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matches_fake_quant_fp32(weights, layout, backend):
    layer = quant_linear(WEIGHTS[weights], **LAYOUTS[layout])
    x = torch.randn(6, T, 64) * 3  # [B·S, T, K]; 24 token rows
    x[0, 0] = 0.0  # an all-zero token
    x[1, 2, 5] = 80.0  # an outlier
    with torch.no_grad():
        fake = layer(x)
        fp8 = FP8Linear.from_quant_linear(layer, backend=backend)
        out = fp8(x)
    assert out.shape == fake.shape and out.dtype == torch.float32
    error = relative(out, fake)
    assert error <= 1e-5, error  # the brief's bound is 1e-3: same codes, only float32 summation order differs
    expected_format = "fp8_e4m3" if layer.weight_quantizer.fp8 else "int"
    assert fp8.w_format == expected_format
    assert relative(fake, torch.nn.functional.linear(x, layer.weight, layer.bias)) > 10 * error  # quantization shows


def test_bf16_activations():
    layer = quant_linear(WEIGHTS["w4_affine"], tqe=True, frames=T, smooth=True)
    x = torch.randn(6, T, 64)
    with torch.no_grad():
        fake32 = layer(x)
        fake16 = layer(x.bfloat16())
        out = FP8Linear.from_quant_linear(layer)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert relative(out, fake32) < 1e-2 and relative(out, fake16) < 1e-2


def test_integer_codes_are_exact_in_e4m3():
    # every (code, zero code) of the 4-bit affine and 5-bit symmetric grids: q − z is an e4m3 value
    codes = torch.arange(-8, 8)
    diffs = (codes[:, None] - codes[None, :]).float()
    assert torch.equal(diffs.to(torch.float8_e4m3fn).float(), diffs)
    sym5 = torch.arange(-16, 16).float()
    assert torch.equal(sym5.to(torch.float8_e4m3fn).float(), sym5)
    layer = quant_linear(WEIGHTS["w4_affine"])
    fp8 = FP8Linear.from_quant_linear(layer)
    assert fp8.qweight.dtype == torch.uint8 and fp8.qweight.shape == (48, 32)  # packed two per byte
    unpacked = unpack_codes(fp8.qweight, 4, 64).float() - fp8.w_zero.float()[:, None]
    assert torch.equal(fp8.e4m3_weight().float(), unpacked)
    assert unpacked.abs().max() <= 15
    with torch.no_grad():
        assert torch.equal(fp8.dequantized_weight(), layer.effective_weight())


def test_weight_cache_and_dtype_moves():
    layer = quant_linear(WEIGHTS["w4_affine"], tqe=True)
    fp8 = FP8Linear.from_quant_linear(layer)
    x = torch.randn(10, 64)
    with torch.no_grad():
        plain = fp8(x)
        fp8.cache_weight = True
        fp8.prepare()
        assert fp8.weight_e4m3 is not None and fp8.weight_e4m3.dtype == torch.float8_e4m3fn
        assert torch.equal(fp8(x), plain)
        assert "weight_e4m3" not in fp8.state_dict()  # derived, not stored
        fp8.to(torch.bfloat16)  # a model cast must not touch the e4m3 codes or the float32 scales
    assert fp8.w_scale.dtype == torch.float32 and fp8.post_a.dtype == torch.float32
    w8 = FP8Linear.from_quant_linear(quant_linear(WEIGHTS["w8_fp8"])).to(torch.bfloat16)
    assert w8.qweight.dtype == torch.float8_e4m3fn and w8.bias.dtype == torch.float32


def test_bf16_bias_is_cast_once(monkeypatch):
    """`prepare` keeps the bias in bf16 (the GEMM rounds it to the output dtype anyway): bf16 inputs hand fp8_gemm that
    copy, with the same output, other dtypes the float32 bias. It is derived: not in the state dict or the weight
    bytes, cleared by a loaded state dict, not carried into a merged layer."""
    from qdiff.lowbit.merge import merge_linears

    layers = [FP8Linear.from_quant_linear(quant_linear(WEIGHTS["w8_fp8"], seed=seed)) for seed in range(2)]
    fp8 = layers[0]
    biases = []
    original = fp8_linear.fp8_gemm

    def spy(*args, **kwargs):
        biases.append(args[4])  # fp8_gemm(codes, scale, w, w_scale, bias, ...)
        return original(*args, **kwargs)

    monkeypatch.setattr(fp8_linear, "fp8_gemm", spy)
    x = torch.randn(10, 64).bfloat16()
    weight_bytes = fp8.weight_bytes()
    with torch.no_grad():
        uncached = fp8(x)
        for layer in layers:
            layer.prepare()
        assert fp8.bias_bf16.dtype == torch.bfloat16 and torch.equal(fp8.bias_bf16, fp8.bias.bfloat16())
        assert torch.equal(fp8(x), uncached)
        fp8(x.float())
    assert biases[0] is fp8.bias and biases[1] is fp8.bias_bf16 and biases[2] is fp8.bias
    assert "bias_bf16" not in fp8.state_dict() and fp8.weight_bytes() == weight_bytes
    merged = merge_linears(layers)
    assert merged.bias_bf16 is None  # the first layer's [N] copy would be stale for the merged [2N]
    fp8.load_state_dict(fp8.state_dict())
    assert fp8.bias_bf16 is None


def test_gemm_dispatch_and_fallback(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    a, scale_a = fp8_linear.quantize_fp8_per_token(torch.randn(33, 64, generator=gen))
    w = (torch.randn(48, 64, generator=gen) * 20).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_w, bias = torch.rand(48, generator=gen) + 0.1, torch.randn(48, generator=gen)
    reference = fp8_gemm_reference(a, scale_a, w, scale_w, bias, torch.float32)
    by_hand = (a.float() @ w.float().t()) * scale_a * scale_w[None] + bias
    assert torch.allclose(reference, by_hand, rtol=0, atol=0)
    if fp8_linear.scaled_mm_supported("cpu", torch.float32):  # torch 2.13's CPU kernel; 2.11's raises -> fallback
        kernel = fp8_gemm(a, scale_a, w, scale_w, bias, torch.float32, backend="scaled_mm")
        assert relative(kernel, reference) < 1e-6
    # a device where _scaled_mm raises: 'auto' falls back to the reference, with the same numbers
    monkeypatch.setitem(fp8_linear._PROBED, ("cpu", None, torch.float32, True), False)
    assert torch.equal(fp8_gemm(a, scale_a, w, scale_w, bias, torch.float32, backend="auto"), reference)
    with pytest.raises(ValueError, match="backend"):
        fp8_gemm(a, scale_a, w, scale_w, bias, backend="triton")


def test_probe_failure_is_cached(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("_scaled_mm: not implemented for this device")

    monkeypatch.setattr(fp8_linear, "_PROBED", {})
    monkeypatch.setattr(torch, "_scaled_mm", broken)
    assert not fp8_linear.scaled_mm_supported("cpu", torch.bfloat16)
    assert not fp8_linear.scaled_mm_supported("cpu", torch.bfloat16)
    assert len(calls) == 1
    layer = FP8Linear.from_quant_linear(quant_linear(WEIGHTS["w8_fp8"]))
    with torch.no_grad():
        out = layer(torch.randn(5, 64).bfloat16())  # the fallback runs, _scaled_mm is never called again
    assert out.dtype == torch.bfloat16 and len(calls) == 1  # the cached answer (bf16 output with a bias)


def test_cuda_shape_rule():
    cuda = torch.device("cuda")
    assert fp8_linear.scaled_mm_shape_ok(cuda, 1152, 4608)
    assert not fp8_linear.scaled_mm_shape_ok(cuda, 72, 1152) and not fp8_linear.scaled_mm_shape_ok(cuda, 64, 40)
    assert fp8_linear.scaled_mm_shape_ok(torch.device("cpu"), 72, 40)


def test_refusals():
    with pytest.raises(IntExportError, match="format_8bit: fp8_e4m3"):
        FP8Linear.from_quant_linear(quant_linear(WeightQuantConfig(bits=8)))
    with pytest.raises(IntExportError, match="not exact in e4m3"):
        FP8Linear.from_quant_linear(quant_linear(WeightQuantConfig(bits=5)))
    with pytest.raises(IntExportError, match="never initialised"):
        layer = QuantLinear(torch.randn(8, 16), None, WeightQuantConfig(bits=4), FP8_ACT)
        FP8Linear.from_quant_linear(layer)
    folded = quant_linear(WEIGHTS["w8_fp8"])
    folded.fold()
    with pytest.raises(IntExportError, match="folded"):
        FP8Linear.from_quant_linear(folded)
    int_acts = QuantLinear(torch.randn(8, 16), None, WeightQuantConfig(format="fp8_e4m3"), ActQuantConfig())
    int_acts.quant_weight = int_acts.quant_act = True
    with torch.no_grad():
        int_acts(torch.randn(2, 16))
    model = nn.Sequential(int_acts)
    with pytest.raises(IntExportError, match="need FP8 activations"):
        convert_to_int(model)


# ----------------------------------------------------------------------------------------------- model files
class Toy(nn.Module):
    """An embedder kept in FP, a spatial linear, a temporal linear on [B*S, T, C] and an MLP (W8 in mixed configs)."""

    def __init__(self, c=48):
        super().__init__()
        self.embed = nn.Linear(c, c)
        self.attn = nn.Linear(c, c)
        self.attn_temp = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):  # x [B, T, S, C]
        b, t, s, c = x.shape
        x = self.embed(x)
        x = x + self.attn(x)
        xt = x.permute(0, 2, 1, 3).reshape(b * s, t, c)
        x = x + self.attn_temp(xt).reshape(b, s, t, c).permute(0, 2, 1, 3)
        return x + self.mlp(x)


ADAPTER = ModelAdapter("toy", lambda name, model: T if name == "attn_temp" else None)
INFO = {"hidden_size": 48}


def config(**changes):
    base = {"method": "viditq", "weight": {"bits": 4, "format_8bit": "fp8_e4m3"}, "act": {"format": "fp8_e4m3"},
            "tqe": {"rank": 4, "rank_out": 1}, "balance": {"method": "smooth", "alpha": 0.5}, "fp_layers": ["embed"],
            "mixed_precision": {"weight_bits_file": "configs/quant/mixed_precision/weight_8_mlp.yaml"}}
    base.update(changes)
    return QuantConfig.from_dict(base)


def calibrated(qconfig, seed=0):
    torch.manual_seed(seed)
    model = Toy()
    quantize_model(model, qconfig, adapter=ADAPTER)
    calibrate_balancing(model, qconfig, lambda: model(torch.randn(2, T, 6, 48)))
    init_weight_quantizers(model)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "lora_b", None) is not None:
                module.lora_b.normal_(0, 0.01)
                module.lora_b_out.normal_(0, 0.01)
            if getattr(module, "frame_scale", None) is not None:
                module.frame_scale.normal_(0, 0.5)
    set_quant_state(model, weight=True, act=True)
    return model


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"), nn.Linear(4 * c, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mlp = Mlp(c)


class MlpToy(Toy):
    """Toy whose MLP linears carry the names the W8 map names (blocks.0.mlp.fc1 / fc2)."""

    def __init__(self, c=48):
        super().__init__(c)
        del self.mlp
        self.blocks = nn.ModuleList([Block(c)])

    def forward(self, x):  # x [B, T, S, C]
        b, t, s, c = x.shape
        x = self.embed(x)
        x = x + self.attn(x)
        xt = x.permute(0, 2, 1, 3).reshape(b * s, t, c)
        x = x + self.attn_temp(xt).reshape(b, s, t, c).permute(0, 2, 1, 3)
        return x + self.blocks[0].mlp(x)


def test_export_round_trip_and_header(tmp_path):
    qconfig = config()
    torch.manual_seed(0)
    model = MlpToy()
    quantize_model(model, qconfig, adapter=ADAPTER)
    calibrate_balancing(model, qconfig, lambda: model(torch.randn(2, T, 6, 48)))
    init_weight_quantizers(model)
    set_quant_state(model, weight=True, act=True)
    x = torch.randn(2, T, 6, 48)
    with torch.no_grad():
        fake = model(x)
        path = export_int_model(model, tmp_path / "w.safetensors", qconfig, INFO)
        fresh = MlpToy()
        fresh.embed.load_state_dict(model.embed.state_dict())
        loaded = load_int_model(fresh, path, qconfig, INFO)
        converted = convert_to_int(copy.deepcopy(model))
        out_loaded, out_converted = loaded(x), converted(x)
    names = sorted(name for name, _ in fp8_layers(loaded))
    assert names == ["attn", "attn_temp", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert type(loaded.embed) is nn.Linear
    for (name, a), (_, b) in zip(fp8_layers(converted), fp8_layers(loaded)):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys(), name
        assert all(torch.equal(state_a[k].view(torch.uint8) if state_a[k].dtype == torch.float8_e4m3fn else state_a[k],
                               state_b[k].view(torch.uint8) if state_b[k].dtype == torch.float8_e4m3fn else state_b[k])
                   for k in state_a), name
    assert torch.equal(out_loaded, out_converted)
    assert relative(out_loaded, fake) < 1e-5

    header = read_int_header(path)
    assert header["format_version"] == "2"
    assert header["formats"] == {"weight": ["fp8_e4m3", "int"], "act": ["fp8_e4m3"]}
    assert header["bits"] == {"weight": [4, 8], "act": [8]}
    attn, fc1 = header["layers"]["attn"], header["layers"]["blocks.0.mlp.fc1"]
    assert attn["kind"] == "fp8" and attn["w_format"] == "int" and attn["container"] == "int4x2" and attn["smooth"]
    assert fc1["w_format"] == "fp8_e4m3" and fc1["container"] == "float8_e4m3fn"
    assert header["layers"]["attn_temp"]["num_frames"] == T and header["layers"]["attn_temp"]["rank_out"] == 1
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("blocks.0.mlp.fc1.qweight").dtype == torch.float8_e4m3fn
        assert handle.get_tensor("attn.qweight").dtype == torch.uint8
    fp32_bytes = sum(4 * (l.in_features + 1) * l.out_features for _, l in fp8_layers(loaded))
    assert sum(layer.weight_bytes() for _, layer in fp8_layers(loaded)) < 0.35 * fp32_bytes  # 1 B and ½ B per weight
    assert int_weight_bytes(loaded) < sum(t.numel() * 4 for t in MlpToy().state_dict().values()) / 2

    # another config (integer activations) is refused, naming the key
    with pytest.raises(IntWeightsError, match="act.format: file has 'fp8_e4m3'"):
        load_int_model(MlpToy(), path, config(act={"bits": 8}), INFO)
    set_int_backend(loaded, "triton")
    assert {layer.backend for _, layer in fp8_layers(loaded)} == {"scaled_mm"}


def test_integer_only_files_keep_version_1(tmp_path):
    qconfig = QuantConfig.from_dict({"weight": {"bits": 4}, "act": {"bits": 8}, "fp_layers": ["embed"]})
    model = calibrated(qconfig)
    path = export_int_model(model, tmp_path / "int.safetensors", qconfig)
    header = read_int_header(path)
    assert header["format_version"] == "1" and header["formats"] == {"weight": ["int"], "act": ["int"]}
    with safe_open(str(path), framework="pt") as handle:
        assert "formats" not in handle.metadata()
    assert all(isinstance(module, IntLinear) for module in (load_int_model(Toy(), path, qconfig).attn,))


def test_w8a8_fp8_model(tmp_path):
    qconfig = QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml").replace(fp_layers=("embed",), fp_layers_file=None)
    model = calibrated(qconfig)
    x = torch.randn(2, T, 6, 48)
    with torch.no_grad():
        fake = model(x)
        convert_to_int(model)
        out = model(x)
    assert {type(layer) for _, layer in fp8_layers(model)} == {FP8Linear}
    assert {layer.w_format for _, layer in fp8_layers(model)} == {"fp8_e4m3"}
    assert relative(out, fake) < 1e-5
