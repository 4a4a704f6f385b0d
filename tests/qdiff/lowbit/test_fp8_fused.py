"""Fused producers for FP8Linear (qdiff.lowbit.fused): FP8Linear layers fed a QuantizedInput give exactly what they give
on the eager activation (CPU: the torch reference runs the model's own ops), readers share launches where their input
signature agrees, unfusable readers are refused; the tiny STDiT (w8a8_fp8, w4a8_fp8) gives the same output with
fusion on and off (also with the residual adds fused in front of the quantization, frame-major temporal attention
with the temporal table added in the same kernel, and merged q/k/v included), and with the MLP residual add deferred
into the next block's norm1 quantization as with it in its block; under torch.compile
(int_act_quant="fused" / "kernel") the FP8 quantization is one opaque op per launch with the producers (and residual
adds) inside, no graph break, and the eager output. Also: compiled IntLinear readers without smoothing share one
launch."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.config import QuantConfig
from qdiff.lowbit import (
    FP8Act,
    FP8Linear,
    IntLinear,
    QuantizedInput,
    convert_to_int,
    fp8_layers,
    fused,
    quantize_gelu,
    quantize_layernorm_modulate,
    set_fusion,
)
from t2v.models.embeddings import t2i_modulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDTH = 64


def sibling(name: str):
    """A test module beside this one, for its helpers (pytest's importlib mode has no package imports)."""
    spec = importlib.util.spec_from_file_location(f"fp8_fused_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


linear_helpers = sibling("test_fp8_linear")  # quant_linear(weight_cfg, ...): an FP8-activation QuantLinear; WEIGHTS
model_helpers = sibling("test_lowbit_model")  # calibrated(qconfig) -> (fp, fake-quant tiny STDiT); inputs()
int_helpers = sibling("test_lowbit_int_linear")  # quant_linear(...): an integer QuantLinear


def readers(count=3, weights="w8_fp8", backend="auto", **kwargs):
    layers = [FP8Linear.from_quant_linear(linear_helpers.quant_linear(linear_helpers.WEIGHTS[weights], k=WIDTH,
                                                                      seed=seed, **kwargs), backend=backend)
              for seed in range(count)]
    for layer in layers:
        set_fusion(layer, True)
    return layers


def modulation(batch=2, tokens=12):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, WIDTH, generator=gen) * torch.linspace(0.2, 4, WIDTH)
    return x, torch.randn(batch, 1, WIDTH, generator=gen), torch.randn(batch, 1, WIDTH, generator=gen) * 0.3


NORM = nn.LayerNorm(WIDTH, eps=1e-6, elementwise_affine=False)


@pytest.fixture
def launches(monkeypatch):
    """Counts the FP8 quantization launches of the fused helpers: producer kinds (None: none), and ("residual",
    kind or 0) for the launches with the residual step in front (("residual", kind or 0, "table") with a table)."""
    calls = []
    original, original_residual = fused.quantize_fp8_per_token, fused.quantize_fp8_residual

    def counting(x, smooth_scale=None, producer=None, **kwargs):
        calls.append(None if producer is None else producer.kind)
        return original(x, smooth_scale, producer, **kwargs)

    def counting_residual(x, residual, smooth_scale=None, producer=None, **kwargs):
        calls.append(("residual", 0 if producer is None else producer.kind) + (() if residual.table is None
                                                                               else ("table",)))
        return original_residual(x, residual, smooth_scale, producer, **kwargs)

    monkeypatch.setattr(fused, "quantize_fp8_per_token", counting)
    monkeypatch.setattr(fused, "quantize_fp8_residual", counting_residual)
    return calls


@pytest.mark.parametrize("weights", ["w8_fp8", "w4_affine"])
@pytest.mark.parametrize("layout,shared", [(dict(), True), (dict(smooth=True, tqe=True), False),
                                           (dict(tqe=True, frames=linear_helpers.T), True)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_layernorm_modulate_input_equals_eager(launches, weights, layout, shared, backend):
    layers = readers(weights=weights, backend=backend, **layout)
    x, shift, scale = modulation()
    quantized = quantize_layernorm_modulate(x, NORM, shift, scale, *layers)
    assert isinstance(quantized, QuantizedInput) and quantized.shape == x.shape and quantized.dtype == x.dtype
    assert len(launches) == (1 if shared else 3)  # no smoothing: one launch; each smoothing scale: its own
    assert all(isinstance(act, FP8Act) and proj is None for act, proj in quantized.acts.values())
    eager = t2i_modulate(NORM(x), shift, scale)
    rows = x.numel() // WIDTH // linear_helpers.T  # temporal layers read [B·S, T, K]: the same rows reshaped
    shape = (rows, linear_helpers.T, WIDTH) if "frames" in layout else x.shape
    with torch.no_grad():
        for layer in layers:
            out = layer(quantized.reshape(*shape))
            assert torch.equal(out, layer(eager.reshape(shape)))  # the same codes, the same GEMM
            assert out.shape == (*shape[:-1], 48)


def test_gelu_input_and_shared_smoothing(launches):
    layers = readers(count=2, smooth=True)
    h = torch.randn(37, WIDTH) * 3
    quantized = quantize_gelu(h, nn.GELU(approximate="tanh"), *layers)
    assert launches == [2, 2]
    with torch.no_grad():
        for layer in layers:
            assert torch.equal(layer(quantized), layer(nn.functional.gelu(h, approximate="tanh")))
    layers[1].smooth_scale = layers[0].smooth_scale  # one smoothing tensor: one signature, one launch
    quantize_gelu(h, nn.GELU(approximate="tanh"), *layers)
    assert launches == [2, 2, 2]
    assert quantize_gelu(h, nn.GELU(), *layers) is None  # the erf GELU is not fused


def test_unfusable_readers_are_refused():
    x, shift, scale = modulation()
    plain = readers(count=1)
    mixed_backends = readers(count=2)
    mixed_backends[1].backend = "torch"
    integer = IntLinear.from_quant_linear(int_helpers.quant_linear(d_in=WIDTH, smooth=False, rotation=None),
                                          backend="torch")
    set_fusion(integer, True)
    cases = {"rotation": readers(count=1, rotate=True), "nn.Linear": [nn.Linear(WIDTH, 8)],
             "IntLinear and FP8Linear": plain + [integer], "mixed backends": mixed_backends}
    for name, layers in cases.items():
        assert quantize_layernorm_modulate(x, NORM, shift, scale, *layers) is None, name
    set_fusion(plain[0], False)
    assert quantize_layernorm_modulate(x, NORM, shift, scale, *plain) is None
    set_fusion(plain[0], True)
    quantized = quantize_layernorm_modulate(x, NORM, shift, scale, *plain)
    with pytest.raises(ValueError, match="not quantized for this layer"):
        readers(count=1)[0](quantized)


RESIDUAL_ADD_LN, RESIDUAL_ADD, RESIDUAL_ADD_TABLE = ("residual", 1), ("residual", 0), ("residual", 0, "table")


@pytest.mark.parametrize("yaml,expected", [
    # per block: q/k/v share one launch (block 1's after block 0's deferred MLP residual add, with norm1 + modulate);
    # cross-attention's q after the temporal residual add; fc1 after the cross residual add, with norm2 + modulate;
    # fc2's GELU
    ("configs/quant/w8a8_fp8.yaml", {1: 1, RESIDUAL_ADD: 2, RESIDUAL_ADD_LN: 3, 2: 2}),
    # smoothing: q, k, v a launch each; block 1's k and v read the sum its q's launch wrote
    ("configs/quant/w4a8_fp8.yaml", {1: 3 + 2, RESIDUAL_ADD: 2, RESIDUAL_ADD_LN: 3, 2: 2}),
])
def test_stdit_fusion_on_equals_off(launches, yaml, expected):
    _, model = model_helpers.calibrated(QuantConfig.from_yaml(yaml))
    convert_to_int(model)
    x, t, y, mask = model_helpers.inputs()
    with torch.no_grad():
        unfused = model(x, t, y, mask=mask)
        assert not launches  # fusion is opt-in
        set_fusion(model, True)
        out = model(x, t, y, mask=mask)
    assert {kind: launches.count(kind) for kind in set(launches)} == expected
    assert torch.equal(out, unfused)


@pytest.mark.parametrize("yaml", ["configs/quant/w8a8_fp8.yaml", "configs/quant/w4a8_fp8.yaml"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stdit_deferred_mlp_residual_runs_in_norm1_quantization(monkeypatch, yaml, dtype):
    """Inference with fusion on: block 0's MLP residual add runs in the quantization of block 1's spatial q/k/v input
    (`quantize_residual` with norm1, fused), and the output is the in-block adds' bit for bit: on the CPU the fused
    path runs the torch reference, the model's own ops (the GPU kernels: tests/qdiff/kernels/test_residual_quant.py)."""
    import t2v.models.stdit as stdit

    _, model = model_helpers.calibrated(QuantConfig.from_yaml(yaml))
    convert_to_int(model)
    model.to(dtype)
    set_fusion(model, True)
    calls = []  # (norm, fused) per quantize_residual call
    original = stdit.quantize_residual

    def spy(*args, norm=None, **kwargs):
        result = original(*args, norm=norm, **kwargs)
        calls.append((norm, result is not None))
        return result

    monkeypatch.setattr(stdit, "quantize_residual", spy)
    x, t, y, mask = model_helpers.inputs()
    norm1 = [block.norm1 for block in model.blocks]  # modules compare by identity
    with torch.no_grad():
        deferred = model(x, t, y, mask=mask)
        assert [call for call in calls if call[0] in norm1] == [(block.norm1, True) for block in model.blocks[1:]]
        calls.clear()
        model.defer_mlp_residual = False
        in_block = model(x, t, y, mask=mask)
    assert calls and not any(norm in norm1 for norm, _ in calls)
    assert torch.equal(deferred, in_block)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stdit_frame_major_residual_fusion_equals_off(launches, static, merged, dtype):
    """Frame-major temporal attention ("short_triton"): the spatial residual add, and the temporal table where the
    block has one, run in the quantization of the temporal q/k/v (or merged qkv) input. Block 0 adds the real table;
    block 1 none, or (static: the compiled blocks' inputs, here eager) a zero table. CPU: bit for bit."""
    from t2v.models.stdit import merge_qkv, set_temporal_attention

    _, model = model_helpers.calibrated(QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml"))
    convert_to_int(model)
    if merged:
        assert merge_qkv(model) == {}
    model.to(dtype)
    set_temporal_attention(model, "short_triton")
    model.static_block_inputs = static
    x, t, y, mask = model_helpers.inputs()
    with torch.no_grad():
        assert all(block.attn_temp.runs_frame_major(x) for block in model.blocks)
        unfused = model(x, t, y, mask=mask)
        set_fusion(model, True)
        out = model(x, t, y, mask=mask)
    tables = 1 + static  # block 0's temporal q/k/v read x + the table, block 1's x (+ zeros when static)
    # block 1's spatial q/k/v read block 0's deferred MLP residual add; static: block 0's a zero one too
    expected = {1: 1 - static, RESIDUAL_ADD: 2 + 2 - tables, RESIDUAL_ADD_TABLE: tables, RESIDUAL_ADD_LN: 3 + static,
                2: 2}
    assert {kind: launches.count(kind) for kind in set(launches)} == {k: n for k, n in expected.items() if n}
    assert out.dtype == torch.float32 and torch.equal(out, unfused)


def test_residual_with_table_quantizes_the_table_sum(launches):
    """quantize_residual(table=): the stream is x + gate·y, the readers get (x + gate·y) + table[frame] (frame-major
    tokens, the eager add); a table the kernel cannot take (another dtype: eager would promote; T not dividing the
    tokens; another width) is refused."""
    layers = readers(weights="w4_affine", smooth=True, tqe=True)
    x, y, gate = torch.randn(2, 12, WIDTH), torch.randn(2, 12, WIDTH), torch.randn(2, 1, WIDTH)
    table = torch.randn(4, WIDTH)  # T = 4 frames of 3 tokens
    s, quantized = fused.quantize_residual(x, y, gate, *layers, table=table)
    assert launches == [("residual", 0, "table"), None, None]  # the other smoothing scales read the table sum
    assert torch.equal(s, x + gate * y)
    u = (s.view(2, 4, 3, WIDTH) + table[:, None]).view(s.shape)
    with torch.no_grad():
        for layer in layers:
            assert torch.equal(layer(quantized), layer(u))
    for other in (table.double(), torch.randn(5, WIDTH), torch.randn(4, WIDTH + 1)):
        assert fused.quantize_residual(x, y, gate, *layers, table=other) is None


def compiled_vs_eager(model, int_act_quant):
    """(eager output, compiled output, call targets of the one graph) of the tiny model, aot_eager."""
    eager, compiled, graphs = sibling("test_lowbit_compile").compiled_vs_eager(model, int_act_quant=int_act_quant)
    assert len(graphs) == 1  # fullgraph (no graph break), one graph serves both blocks
    return eager, compiled, [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("mode,launches_per_block", [("fused", 13 - 2), ("kernel", 13)])
def test_stdit_compiles_with_fp8_kernel_op(mode, launches_per_block):
    """fused: LayerNorm + modulate and GELU move into the op and q, k, v share one launch (13 FP8 layers per block);
    kernel: every layer quantizes its own input with the op. CPU: the op runs the reference, the eager output."""
    _, model = model_helpers.calibrated(QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml"))
    convert_to_int(model)
    eager, compiled, targets = compiled_vs_eager(model, mode)
    assert sum("qdiff.quantize_fp8_per_token" in t for t in targets) == launches_per_block
    # fused: the deferred MLP residual add of the block before (zeros for block 0), the temporal and the cross residual
    # adds run in the quantization of q/k/v's, cross q's and fc1's inputs (the compiled blocks all get a temporal
    # table, so the spatial one never feeds the temporal q/k/v directly)
    assert sum("qdiff.quantize_fp8_per_token_residual" in t for t in targets) == (3 if mode == "fused" else 0)
    left = [t for t in targets if "layer_norm" in t or "gelu" in t]
    assert not left if mode == "fused" else left, left
    assert all(layer.compile_act_quant == mode for _, layer in fp8_layers(model))
    assert float((compiled - eager).norm() / eager.norm()) < 1e-6  # the TQE-free W8A8 model: summation order only


@pytest.mark.parametrize("yaml,fused_blocks", [("configs/quant/w8a8_fp8.yaml", 2), ("configs/quant/w4a8_fp8.yaml", 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stdit_triton_cross_attention_writes_proj_codes(monkeypatch, yaml, fused_blocks, dtype):
    """Cross-attention core "triton" with fp8_output and fusion on: the attention quantizes its output for an FP8
    proj without smoothing (`cross_attention_fp8`, one call per block; w4a8_fp8's proj divides by a smoothing scale:
    not fused). CPU: the reference attention and quantization, so the output equals fusion off bit for bit."""
    import t2v.models.stdit as stdit

    _, model = model_helpers.calibrated(QuantConfig.from_yaml(yaml))
    convert_to_int(model)
    model.to(dtype)
    stdit.set_cross_attention(model, "triton")
    model.static_block_inputs = True  # the padded text the kernel takes (what compiled blocks run)
    calls = []
    original = stdit.cross_attention_fp8
    monkeypatch.setattr(stdit, "cross_attention_fp8", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    x, t, y, mask = model_helpers.inputs()
    with torch.no_grad():
        unfused = model(x, t, y, mask=mask)
        set_fusion(model, True)
        assert torch.equal(model(x, t, y, mask=mask), unfused)
        assert not calls  # fp8_output is opt-in
        for block in model.blocks:
            block.cross_attn.fp8_output = True
        out = model(x, t, y, mask=mask)
    assert calls == [dict(fast=False, backend="auto")] * fused_blocks
    assert torch.equal(out, unfused)


def test_stdit_compiled_triton_cross_attention_records_the_fp8_op():
    """Compiled with cross_attention="triton", fp8_output and int_act_quant="fused": one cross_attention_fp8 op per
    block in place of the cross-attention and proj's quantization (the fast flag on, as compiled fused layers
    quantize); the output is the eager one (CPU: the references)."""
    _, model = model_helpers.calibrated(QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml"))
    convert_to_int(model)
    for block in model.blocks:
        block.cross_attn.fp8_output = True
    eager, compiled, graphs = sibling("test_lowbit_compile").compiled_vs_eager(model, int_act_quant="fused",
                                                                                cross_attention="triton")
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("qdiff.cross_attention_fp8" in t for t in targets) == 1
    assert not any("qdiff.cross_attention.default" in t for t in targets)
    # q/k/v, cross q and fc1 after residual adds, fc2's GELU, kv_linear: the cross proj's launch is gone
    assert sum("qdiff.quantize_fp8_per_token" in t for t in targets) == 13 - 2 - 1
    assert float((compiled - eager).norm() / eager.norm()) < 1e-6


def fp8_linear(layout):
    layer = readers(count=1, weights="w4_affine", **layout)[0]
    layer.prepare()
    return layer


@pytest.mark.parametrize("layout", [dict(smooth=True), dict(smooth=True, rotate=True, tqe=True),
                                    dict(tqe=True, frames=linear_helpers.T)])
@pytest.mark.parametrize("act_quant", ["torch", "kernel", "fused"])
def test_fp8_linear_compiled_equals_eager(layout, act_quant):
    layer = fp8_linear(layout)
    layer.compile_act_quant = act_quant
    x = torch.randn(6, linear_helpers.T, WIDTH)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # TQE projection: summation order only


def graph_of(fn, *args):
    """(eager result, compiled result, qdiff op names of the one graph) of fn(*args), backend eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    names = [str(node.target).removesuffix(".default") for node in graphs[0].graph.nodes if node.op == "call_function"]
    return fn(*args), compiled, [name for name in names if name.startswith("qdiff.quantize")]


@pytest.mark.parametrize("kind", ["fp8", "int"])
@pytest.mark.parametrize("smooth", [False, True])
def test_compiled_readers_share_one_launch_without_smoothing(kind, smooth):
    """Compiled, readers without a smoothing scale share one launch (a signature without tensor ids); each reader
    with one keeps its own."""
    if kind == "fp8":
        layers = readers(smooth=smooth, tqe=True)
    else:
        torch.manual_seed(0)
        layers = [IntLinear.from_quant_linear(int_helpers.quant_linear(d_in=WIDTH, smooth=smooth, rotation=None),
                                              backend="torch") for _ in range(3)]
    for layer in layers:
        layer.prepare()
    for layer in layers:
        layer.compile_act_quant = "fused"  # compiled; eager: fuse_input
        layer.fuse_input = True
    x, shift, scale = modulation()

    def block(x, shift, scale):
        quantized = quantize_layernorm_modulate(x, NORM, shift, scale, *layers)
        return tuple(layer(quantized) for layer in layers)

    with torch.no_grad():
        eager, compiled, names = graph_of(block, x, shift, scale)
    assert names == [f"qdiff.quantize{'_fp8' if kind == 'fp8' else ''}_per_token"] * (3 if smooth else 1)
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
