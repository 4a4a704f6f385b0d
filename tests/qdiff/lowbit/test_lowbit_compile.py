"""torch.compile of quantized STDiT models on the CPU (`compile_blocks` / `qdiff.compile_model`): the integer model
(IntLinear: custom-op GEMM, plain-torch or kernel activation quantization) and the fake-quant model (QuantLinear)
compile with fullgraph=True (no graph breaks) and compute what their eager forwards compute. aot_eager backend:
dynamo + AOT autograd with the ops' fake implementations, no code generation (fast on a 2-core CPU); inductor itself
(C++ code for the fused quantization) with QVDIT_TEST_INDUCTOR=1."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.config import QuantConfig, apply_overrides
from qdiff.lowbit import IntLinear, convert_to_int, int_layers, pack_codes
from qdiff.quantizers.config import ActQuantConfig
from qdiff.quantizers.uniform import DynamicActQuantizer, StaticActQuantizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sibling(name: str):
    """A test module beside this one, for its helpers (pytest's importlib mode has no package imports)."""
    spec = importlib.util.spec_from_file_location(f"lowbit_compile_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = sibling("test_lowbit_model")  # calibrated(qconfig) -> (fp, fake-quant tiny STDiT); inputs()


def model_for(yaml, overrides=()):
    qconfig = apply_overrides(QuantConfig.from_yaml(yaml), ["distill.enabled=false", *overrides])
    return helpers.calibrated(qconfig)[1]


def compiled_vs_eager(model, **compile_kwargs):
    """(eager output, compiled output, graphs compiled) of the tiny model's blocks; the model is left uncompiled. The
    position tables and the head run eagerly here (compile_ends=False), so the graphs are the blocks' (the compiled
    ends are checked in tests/t2v/models/test_stdit_compile.py)."""
    x, t, y, mask = helpers.inputs()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, y, mask=mask)
        qdiff.compile_model(model, backend=backend, compile_ends=False, **compile_kwargs)  # STDiT: compile_blocks
        compiled = model(x, t, y, mask=mask)
    qdiff.compile_model(model, enabled=False)
    torch._dynamo.reset()
    return eager, compiled, graphs


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("yaml,overrides,act_quant", [
    ("configs/quant/w8a8_qvdit.yaml", [], "torch"),  # shared q/k/v inputs, TQE rank 1, frame factors
    ("configs/quant/w4a8_qvdit.yaml", ["balance.method=smooth_rotate"], "kernel"),  # int4, smooth + rotate; kernel op
])
def test_int_model_compiles_and_matches_eager(yaml, overrides, act_quant):
    model = model_for(yaml, overrides)
    convert_to_int(model, backend="torch")
    eager, compiled, graphs = compiled_vs_eager(model, int_act_quant=act_quant)
    assert len(graphs) == 1  # fullgraph (no graph breaks), one graph serves both blocks
    ops = {str(node.target).removesuffix(".default") for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert "qdiff.int_gemm" in ops and ("qdiff.quantize_per_token" in ops) == (act_quant == "kernel")
    # the same codes up to float summation order in the attention and LayerNorm: a code may move by one step
    assert relative(compiled, eager) < 1e-4
    layer = next(iter(int_layers(model)))[1]
    assert layer.compile_act_quant == act_quant and layer.w_colsum is not None  # prepared before tracing


def test_int_model_compiles_with_fused_producers():
    """int_act_quant="fused": LayerNorm + modulate and GELU move into the quantization op, no graph breaks, and on the
    CPU (the op's reference runs the model's own eager ops) the output is the eager model's."""
    model = model_for("configs/quant/w8a8_qvdit.yaml")
    convert_to_int(model, backend="torch")
    eager, compiled, graphs = compiled_vs_eager(model, int_act_quant="fused")
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "layer_norm" in t or "gelu" in t], "a producer was left outside the op"
    assert sum("qdiff.quantize_per_token" in t for t in targets) >= 7  # spatial q/k/v ... fc1, fc2
    assert relative(compiled, eager) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QVDIT_TEST_INDUCTOR"),
                    reason="inductor compiles C++ kernels for ~1 min on a cold 2-core CPU; set QVDIT_TEST_INDUCTOR=1")
def test_int_model_under_inductor():
    """The real compiler: LayerNorm + modulate and GELU fused with the plain-torch quantization (CPU C++ kernels)."""
    model = model_for("configs/quant/w8a8_qvdit.yaml")
    convert_to_int(model, backend="torch")
    x, t, y, mask = helpers.inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, y, mask=mask)
        qdiff.compile_model(model)
        compiled = model(x, t, y, mask=mask)
    qdiff.compile_model(model, enabled=False)
    torch._dynamo.reset()
    assert relative(compiled, eager) < 1e-4


def test_fake_quant_model_compiles_and_matches_eager():
    """W4A8 Q-VDiT with smoothing + rotation: TQE terms, per-frame terms, the weight chain every forward."""
    model = model_for("configs/quant/w4a8_qvdit.yaml", ["balance.method=smooth_rotate"])
    eager, compiled, graphs = compiled_vs_eager(model)
    assert len(graphs) == 1
    assert relative(compiled, eager) < 1e-4


def int_linear(static=False, smooth=False, rotation=False, frames=None, rank_out=0, w_bits=8, a_symmetric=False):
    """A random IntLinear [K=24 -> N=20] (torch backend), prepared for compilation."""
    gen = torch.Generator().manual_seed(3)
    layer = IntLinear(24, 20, w_bits, 8, a_symmetric=a_symmetric,
                      act_mode="static_per_tensor" if static else "dynamic_per_token", num_frames=frames,
                      rank_out=rank_out, smooth=smooth, rotation=rotation, backend="torch")
    codes = torch.randint(-8 if w_bits <= 4 else -128, 8 if w_bits <= 4 else 128, (20, 24), generator=gen)
    layer.qweight.copy_(pack_codes(codes.to(torch.int16), w_bits))
    layer.w_scale.copy_(torch.rand(20, generator=gen) * 0.01)
    layer.w_zero.copy_(torch.randint(-5, 5, (20,), generator=gen))
    layer.bias.copy_(torch.randn(20, generator=gen))
    if static:
        layer.act_static.copy_(torch.tensor([0.02, 3.0]))
    if smooth:
        layer.smooth_scale.copy_(torch.rand(24, generator=gen) + 0.5)
    if rotation:
        layer.rotation.copy_(torch.linalg.qr(torch.randn(24, 24, generator=gen))[0])
    if rank_out:
        layer.post_a.normal_(generator=gen)
        layer.post_b.normal_(0, 0.01, generator=gen)
    if frames and rank_out:
        layer.frame_scale.copy_(torch.rand(frames, generator=gen))
    layer.prepare()
    return layer


@pytest.mark.parametrize("kwargs", [dict(static=True), dict(static=True, a_symmetric=True), dict(smooth=True, w_bits=4),
                                    dict(rotation=True, rank_out=2, frames=3), dict(smooth=True, rank_out=1, frames=3)])
@pytest.mark.parametrize("act_quant", ["torch", "kernel", "fused"])
def test_int_linear_compiled_equals_eager(kwargs, act_quant):
    layer = int_linear(**kwargs)
    layer.compile_act_quant = act_quant
    x = torch.randn(4, 3, 24)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # TQE projection: summation order only


def test_quantizers_compile_without_graph_breaks():
    """The fake quantizers on their own: static ranges (host mirror of `observed`), the reference's shared ranges."""
    static = StaticActQuantizer(ActQuantConfig(bits=8, mode="static_per_tensor"))
    static.observing = True
    static(torch.randn(5, 16))
    static.observing = False
    shared = DynamicActQuantizer(ActQuantConfig(bits=6, reference_token_grouping=True))
    x = torch.randn(2, 5, 16)
    x[:, 1] = 0  # a zero token: every Δ of the tensor becomes 1e-6, as in the reference
    for quantizer in (static, shared):
        torch._dynamo.reset()
        compiled = torch.compile(quantizer, backend="eager", fullgraph=True, dynamic=False)(x)
        assert torch.equal(compiled, quantizer(x))
    torch._dynamo.reset()


def test_unprepared_int_layer_refuses_to_compile():
    model = model_for("configs/quant/w8a8_qvdit.yaml")
    convert_to_int(model, backend="torch")
    layer = next(iter(int_layers(model)))[1]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="prepare"):
        with torch.no_grad():
            torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(3, layer.in_features))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="int_act_quant"):
        qdiff.compile_model(model, int_act_quant="triton")
