"""Merging sibling linears (qdiff.lowbit.merge, t2v.models.stdit.merge_qkv): the merged layer's output is the
siblings' outputs side by side, for nn.Linear, IntLinear and FP8Linear; what cannot merge is refused with a reason."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.config import QuantConfig, apply_overrides
from qdiff.lowbit import FP8Linear, IntExportError, IntLinear, convert_to_int, export_int_model, lowbit_layers
from qdiff.lowbit.merge import merge_linears, merge_problem
from t2v.models.stdit import Attention, merge_qkv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"merge_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = sibling("test_lowbit_model")  # calibrated(qconfig) -> (fp, fake-quant tiny STDiT); inputs()


def converted(yaml: str, overrides=()):
    _, model = helpers.calibrated(apply_overrides(QuantConfig.from_yaml(yaml), list(overrides)))
    with torch.no_grad():
        convert_to_int(model)
    return model


def test_float_linears_merge():
    torch.manual_seed(0)
    layers = [nn.Linear(16, n) for n in (16, 8, 16)]
    merged = merge_linears(layers)
    x = torch.randn(3, 5, 16)
    expected = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(merged(x), expected, rtol=1e-6, atol=1e-6)
    assert merged.merged_out_features == (16, 8, 16)
    assert merge_problem([nn.Linear(16, 4), nn.Linear(8, 4)]) is not None
    assert "types" in merge_problem([layers[0], IntLinear(16, 16, 8, 8)])


@pytest.mark.parametrize("yaml", ["configs/quant/w8a8_ptq.yaml", "configs/quant/w4a8_ptq.yaml",
                                  "configs/quant/w8a8_fp8.yaml"])
def test_merged_attention_equals_unmerged(yaml):
    model = converted(yaml)
    merged = copy.deepcopy(model)
    skipped = merge_qkv(merged)
    assert skipped == {}
    for block in merged.blocks:
        for attn in (block.attn, block.attn_temp):
            assert attn.input_linears() == (attn.qkv,) and not hasattr(attn, "q")
            assert type(attn.qkv) in (IntLinear, FP8Linear) and attn.qkv.out_features == 3 * 64
    x, t, y, mask = helpers.inputs()
    with torch.no_grad():
        expected = model(x, t, y, mask=mask)
        out = merged(x, t, y, mask=mask)
    if "fp8" in yaml:  # float32 sums of exact e4m3 products; only the order may differ
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:  # integer GEMM: the same codes, sums and epilogue per element
        assert torch.equal(out, expected)
    # the merged layers hold the same weight codes (three layers' rows in one); shared input terms once
    def code_bytes(m):
        return sum(layer.qweight.numel() * layer.qweight.element_size() for _, layer in lowbit_layers(m))
    assert code_bytes(merged) == code_bytes(model)
    assert sum(layer.weight_bytes() for _, layer in lowbit_layers(merged)) <= sum(
        layer.weight_bytes() for _, layer in lowbit_layers(model))
    with pytest.raises(IntExportError, match="export the model before merging"):
        export_int_model(merged, Path("/nonexistent/never_written.safetensors"))


def test_merge_refuses_post_terms_and_different_smoothing():
    model = converted("configs/quant/w8a8_qvdit.yaml", ["distill.enabled=false"])
    skipped = merge_qkv(model)
    assert set(skipped) == {f"blocks.{i}.{a}" for i in range(2) for a in ("attn", "attn_temp")}
    assert all("post terms" in why for why in skipped.values())
    layers = [model.blocks[0].attn.q, model.blocks[0].attn.k, model.blocks[0].attn.v]
    with pytest.raises(ValueError, match="rank_out"):
        merge_linears(layers)
    smoothed = converted("configs/quant/w8a8_smoothquant.yaml")
    attn = smoothed.blocks[0].attn
    assert "smooth_scale differ" in merge_problem([attn.q, attn.k, attn.v])


def test_float_stdit_merge_matches():
    torch.manual_seed(0)
    fp, _ = helpers.calibrated(QuantConfig.from_yaml("configs/quant/w8a8_ptq.yaml"))
    merged = copy.deepcopy(fp)
    assert merge_qkv(merged) == {}
    assert isinstance(merged.blocks[0].attn, Attention) and isinstance(merged.blocks[0].attn.qkv, nn.Linear)
    x, t, y, mask = helpers.inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y, mask=mask), fp(x, t, y, mask=mask), rtol=1e-5, atol=1e-5)


def test_merged_int_model_compiles_with_one_quantization_per_attention_input():
    """Compiled with fused producers: one quantization op per block input instead of one per q, k and v."""
    compile_helpers = sibling("test_lowbit_compile")
    model = converted("configs/quant/w8a8_ptq.yaml", ["act.mode=dynamic_per_token"])
    assert merge_qkv(model) == {}
    eager, compiled, graphs = compile_helpers.compiled_vs_eager(model, int_act_quant="fused")
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    # spatial qkv, spatial proj, temporal qkv, temporal proj, cross q, text kv, cross proj, fc1, fc2 (12 unmerged)
    assert sum("qdiff.quantize_per_token" in t for t in targets) == 9
    assert sum("qdiff.int_gemm" in t for t in targets) == 9
    assert compile_helpers.relative(compiled, eager) < 1e-4
