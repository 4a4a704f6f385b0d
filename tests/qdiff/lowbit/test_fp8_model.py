"""Model level: the tiny STDiT calibrated with the shipped FP8 configs (w8a8_fp8, w4a8_fp8), converted to FP8Linear,
equals its fake-quant simulation (float32, CPU), and compiles without graph breaks to the same function."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.config import QuantConfig, apply_overrides
from qdiff.lowbit import FP8Linear, convert_to_int, fp8_layers, int_layers, int_weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"fp8_model_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = sibling("test_lowbit_model")  # calibrated(qconfig) -> (fp, fake-quant tiny STDiT); inputs()


def relative(a, b):
    return float((a - b).norm() / b.norm())


def model_for(yaml, overrides=()):
    return helpers.calibrated(apply_overrides(QuantConfig.from_yaml(yaml), list(overrides)))


@pytest.mark.parametrize("yaml,overrides,w_formats", [
    ("configs/quant/w8a8_fp8.yaml", [], {"fp8_e4m3"}),
    ("configs/quant/w4a8_fp8.yaml", [], {"int", "fp8_e4m3"}),  # attention W4 codes, MLP W8 FP8
    ("configs/quant/w4a8_fp8.yaml", ["balance.method=smooth_rotate"], {"int", "fp8_e4m3"}),
    ("configs/quant/w4a8_fp8.yaml", ["tqe={rank: 4, rank_out: 1, frame_scale: true}"], {"int", "fp8_e4m3"}),
    ("configs/quant/w4a8_fp8_uniform.yaml", [], {"int"}),  # every weight W4 codes, the MLPs too
])
def test_fp8_model_matches_fake_quant(yaml, overrides, w_formats):
    fp, model = model_for(yaml, overrides)
    x, t, y, mask = helpers.inputs()
    with torch.no_grad():
        reference = fp(x, t, y, mask=mask)
        fake = model(x, t, y, mask=mask)
        convert_to_int(model)
        out = model(x, t, y, mask=mask)
    layers = dict(fp8_layers(model))
    assert len(layers) == 2 * 13 and not list(int_layers(model))
    assert {layer.w_format for layer in layers.values()} == w_formats
    assert layers["blocks.0.mlp.fc1"].w_format == ("int" if w_formats == {"int"} else "fp8_e4m3")
    error = relative(out, fake)
    assert error <= 1e-4, error  # the same codes; float32 summation order only
    assert relative(out, reference) > 10 * error  # quantization itself is visible
    assert int_weight_bytes(model) < sum(t.numel() * 4 for t in fp.state_dict().values())
    with torch.no_grad():  # the reference GEMM: the same function (scales applied after the sum; a rounding
        qdiff.lowbit.set_int_backend(model, "torch")  # tie in a later layer's e4m3 codes may flip one step)
        out_reference = model(x, t, y, mask=mask)
    assert relative(out_reference, fake) < 1e-3 and relative(out_reference, reference) > 10 * relative(out_reference, fake)


def test_fp8_model_compiles_and_matches_eager():
    """aot_eager (dynamo + AOT autograd, no code generation): one graph for both blocks, no graph break."""
    _, model = model_for("configs/quant/w4a8_fp8.yaml", ["tqe={rank: 4, rank_out: 1, frame_scale: true}"])
    convert_to_int(model)
    eager, compiled, graphs = sibling("test_lowbit_compile").compiled_vs_eager(model)
    assert len(graphs) == 1
    ops = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert any("_scaled_mm" in op for op in ops) == qdiff.lowbit.scaled_mm_supported("cpu", torch.float32)
    assert relative(compiled, eager) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QVDIT_TEST_INDUCTOR"),
                    reason="inductor compiles C++ kernels for ~1 min on a cold 2-core CPU; set QVDIT_TEST_INDUCTOR=1")
def test_fp8_model_under_inductor():
    """The real compiler: LayerNorm + modulate and the FP8 quantization fused, _scaled_mm in the graph."""
    _, model = model_for("configs/quant/w8a8_fp8.yaml")
    convert_to_int(model)
    x, t, y, mask = helpers.inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x.bfloat16(), t, y.bfloat16(), mask=mask)
        qdiff.compile_model(model)
        compiled = model(x.bfloat16(), t, y.bfloat16(), mask=mask)
    qdiff.compile_model(model, enabled=False)
    torch._dynamo.reset()
    assert relative(compiled.float(), eager.float()) < 2e-2


def test_fp8_layer_compiles_alone():
    _, model = model_for("configs/quant/w8a8_fp8.yaml")
    convert_to_int(model)
    layer = model.blocks[0].attn.q
    assert isinstance(layer, FP8Linear)
    layer.prepare()
    x = torch.randn(2, 5, layer.in_features)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)(x)
        assert torch.equal(compiled, layer(x))
    torch._dynamo.reset()
