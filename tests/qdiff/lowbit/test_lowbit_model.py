"""Model level: the tiny STDiT with IntLinear layers equals its fake-quant simulation (float32, CPU)."""
import copy

import pytest
import torch

from qdiff.api import calibrate_balancing, init_weight_quantizers, quantize_model, set_quant_state
from qdiff.config import QuantConfig, apply_overrides
from qdiff.lowbit import convert_to_int, int_layers, int_weight_bytes, set_fusion, share_input_quantization
from t2v.models.stdit import STDiT
from t2v.pipeline.build import randomize_zero_init

TINY = dict(input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=8)


def inputs(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 4, 8, 8, generator=gen)
    y = torch.randn(batch, 1, 8, 32, generator=gen)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return x, torch.tensor([999, 400][:batch]), y, mask


def calibrated(qconfig):
    torch.manual_seed(0)
    model = randomize_zero_init(STDiT(**TINY).eval())
    fp = copy.deepcopy(model)
    quantize_model(model, qconfig, adapter="stdit")
    calibrate_balancing(model, qconfig, lambda: model(*inputs(seed=2)[:3], mask=inputs(seed=2)[3]))
    init_weight_quantizers(model)
    with torch.no_grad():  # distilled-looking TQE terms
        for module in model.modules():
            if getattr(module, "lora_b", None) is not None:
                module.lora_b.normal_(0, 1e-3)
                module.lora_b_out.normal_(0, 1e-3)
            if getattr(module, "frame_scale", None) is not None:
                module.frame_scale.normal_(0, 0.5)
    set_quant_state(model, weight=True, act=True)
    return fp, model


@pytest.mark.parametrize("yaml,overrides", [
    ("configs/quant/w8a8_qvdit.yaml", []),
    ("configs/quant/w4a8_qvdit.yaml", ["balance.method=smooth_rotate"]),
    ("configs/quant/w4a6_qvdit.yaml", []),
    ("configs/quant/w3a6_viditq.yaml", []),
    ("configs/quant/w8a8_ptq.yaml", []),  # static per-tensor activations
])
def test_int_model_matches_fake_quant(yaml, overrides):
    qconfig = apply_overrides(QuantConfig.from_yaml(yaml), ["distill.enabled=false"] + overrides)
    fp, model = calibrated(qconfig)
    x, t, y, mask = inputs()
    with torch.no_grad():
        reference = fp(x, t, y, mask=mask)
        fake = model(x, t, y, mask=mask)
        convert_to_int(model, backend="torch")
        set_fusion(model, True)
        out = model(x, t, y, mask=mask)
    assert len(list(int_layers(model))) == 2 * 13
    error = float((out - fake).norm() / fake.norm())
    assert error <= 1e-4, error  # the bound is 1e-2; identical codes give float-rounding differences only
    assert float((out - reference).norm() / reference.norm()) > 10 * error  # quantization itself is visible
    assert int_weight_bytes(model) < sum(t.numel() * 4 for t in fp.state_dict().values())
    memo = next(iter(int_layers(model)))[1].input_memo
    shared = qconfig.balance.method == "none"  # q, k, v quantize their shared input once
    assert memo.hits == (2 * 2 if shared else 0)  # 2 blocks × temporal (k, v); the spatial ones take a fused input
    set_fusion(model, False)  # the ablation: LayerNorm, modulation and GELU eager, every linear quantizes its input
    with torch.no_grad():
        unfused = model(x, t, y, mask=mask)
    assert float((unfused - out).norm() / out.norm()) < 1e-6
    assert memo.hits == (2 * 2 + 2 * 2 * 2 if shared else 0)  # now spatial (k, v) hit the memo too
    share_input_quantization(model, enabled=False)
    with torch.no_grad():
        unshared = model(x, t, y, mask=mask)
    assert float((unshared - out).norm() / out.norm()) < 1e-6
