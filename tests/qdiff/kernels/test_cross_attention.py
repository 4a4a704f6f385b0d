"""Cross-attention of many queries against a few keys (`qdiff.kernels.cross_attention`, STDiT's cross-attention): the
PyTorch reference equals SDPA with and without a key mask; the custom op passes `torch.library.opcheck` and is what
torch.compile records; gradients fall back to the reference; a tiny STDiT on padded text with its cross-attention on
"triton" gives the SDPA model's output, eager and compiled. The Triton kernel itself runs in a child process under
Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported): it equals the reference in
float32 and bfloat16 for ragged N, L not a power of two, masked keys, a strided q and k, v as halves of one tensor,
head sizes that are and are not a power of two; its e4m3 form (`cross_attention_fp8_triton`) gives, bit for bit,
the FP8 quantization kernel's codes of its own output."""
import os

import pytest
import torch
import torch.nn.functional as F

from qdiff.kernels import cross_attention as ca
from t2v.models.stdit import STDiT, _attention, compile_blocks, set_cross_attention
from t2v.pipeline.build import randomize_zero_init

CHILD_FLAG = "QDIFF_CROSS_ATTENTION_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
parent_only = pytest.mark.skipif(IN_CHILD, reason="the parent process runs the CPU reference checks")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_triton_kernel_in_child)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 heads of 72 (XL/2's head size), 12 text tokens (not a power of two)
TINY = dict(input_size=(4, 4, 4), hidden_size=144, depth=2, num_heads=2, caption_channels=32, model_max_length=12)
SHAPES = ((2, 70, 12, 3, 24), (3, 64, 120, 2, 72), (1, 33, 5, 4, 16), (2, 16, 128, 1, 128))  # (B, N, L, heads, d)


def inputs(batch, queries, keys, heads, head_dim, dtype=torch.float32, masked=True, seed=0):
    """q [B, N, C] a view of [B, N, 3C], k, v [B, L, C] the halves of [B, L, 2C], and a key mask [B, L] with another
    number of valid keys per sample (sample 0 all valid); the masked keys' values are large, so a leak shows."""
    gen = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    q = (torch.randn(batch, queries, 3 * channels, generator=gen) * 1.5).to(dtype)[..., channels:2 * channels]
    kv = torch.randn(batch, keys, 2 * channels, generator=gen) * 1.5
    mask = None
    if masked:
        valid = torch.tensor([keys - (3 * b) % keys for b in range(batch)])
        mask = torch.arange(keys)[None] < valid[:, None]
        kv[..., channels:] = torch.where(mask[..., None], kv[..., channels:], 1e3)
    k, v = kv.to(dtype).chunk(2, dim=-1)
    return q, k, v, mask


def sdpa(q, k, v, mask, heads):
    """`t2v.models.stdit._attention` (SDPA) on [B, h, rows, d] views, back to [B, N, C]."""
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    out = _attention(split(q), split(k), split(v), None if mask is None else mask[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


def tiny_model():
    torch.manual_seed(0)
    model = randomize_zero_init(STDiT(**TINY).eval())
    model.static_block_inputs = True  # padded text and a key mask: the form compiled blocks run
    return model


def tiny_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, 4, generator=gen)
    y = torch.randn(2, 1, 12, 32, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[-1, 5:] = 0
    return x, torch.tensor([999, 400]), y, mask


def assert_tiny_stdit_matches_sdpa(compiled: bool):
    """The tiny STDiT with cross core "triton" equals it with SDPA: eagerly, or compiled (aot_eager) as one graph
    for both blocks with the op in it once."""
    model = tiny_model()
    x, t, y, mask = tiny_inputs()
    with torch.no_grad():
        reference = model(x, t, y, mask=mask)
    graphs = []
    if compiled:
        def backend(gm, example_inputs):  # aot_eager, keeping the graphs dynamo hands over
            graphs.append(gm)
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

        torch._dynamo.reset()
        compile_blocks(model, temporal_attention="sdpa", cross_attention="triton", backend=backend,
                       compile_ends=False)  # the blocks' graph only
    else:
        set_cross_attention(model, "triton")
    assert all(b.cross_attn.core == "triton" for b in model.blocks)
    with torch.no_grad():
        out = model(x, t, y, mask=mask)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    if compiled:
        assert len(graphs) == 1  # both blocks, no graph break
        names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
        assert names.count("qdiff.cross_attention.default") == 1, names
        compile_blocks(model, enabled=False)
        torch._dynamo.reset()
        assert all(b.cross_attn.core == "sdpa" for b in model.blocks)


# ------------------------------------------------------------------------------------------ CPU (reference) checks
@parent_only
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reference_equals_sdpa(shape, masked):
    """Both float32 on the same inputs: only the summation order differs (d- and L-term sums of O(10) values), so
    they agree to ~1e-6; 1e-5 is a tight bound that a wrong scale, head split or mask breaks by orders of magnitude."""
    q, k, v, mask = inputs(*shape, masked=masked)
    out = ca.cross_attention_reference(q, k, v, mask, shape[3])
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    torch.testing.assert_close(out, sdpa(q, k, v, mask, shape[3]), rtol=1e-5, atol=1e-5)
    if masked:
        assert out.abs().max() < 100  # the masked keys' values (1e3) never leak


@parent_only
def test_cpu_dispatch_is_the_reference():
    q, k, v, mask = inputs(2, 20, 12, 2, 16)
    assert not ca.triton_available("cpu") or ca.interpret_mode()
    expected = ca.cross_attention_reference(q, k, v, mask, 2)
    assert torch.equal(ca.cross_attention(q, k, v, mask, 2), expected)
    assert torch.equal(ca.cross_attention(q, k, v, mask, 2, backend="torch"), expected)


@parent_only
def test_arguments_are_checked():
    q, k, v, mask = inputs(2, 20, 12, 2, 16)
    with pytest.raises(ValueError, match="L = 129"):
        ca.cross_attention(*inputs(1, 4, 129, 2, 16), 2)
    with pytest.raises(ValueError, match="head_dim = 136"):
        ca.cross_attention(*inputs(1, 4, 8, 1, 136), 1)
    with pytest.raises(ValueError, match=r"q \[B, N, C\]"):
        ca.cross_attention(q, k[:, :, :16], v, mask, 2)
    with pytest.raises(ValueError, match=r"q \[B, N, C\]"):
        ca.cross_attention(q, k[:1], v[:1], mask, 2)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        ca.cross_attention(q, k, v, mask.long(), 2)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        ca.cross_attention(q, k, v, mask[:, :5], 2)
    with pytest.raises(ValueError, match="divisible"):
        ca.cross_attention(q, k, v, mask, 3)
    with pytest.raises(TypeError, match="float32"):
        ca.cross_attention(q, k.double(), v, mask, 2)
    with pytest.raises(ValueError, match="backend"):
        ca.cross_attention(q, k, v, mask, 2, backend="cuda")


@parent_only
def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch checks of the op (CPU implementation)."""
    op = torch.ops.qdiff.cross_attention.default
    q, k, v, mask = inputs(2, 20, 12, 2, 16)
    torch.library.opcheck(op, (q, k, v, mask, 2, "auto"))
    torch.library.opcheck(op, (q, k, v, None, 2, "auto"))
    q, k, v, mask = inputs(2, 20, 120, 2, 72, torch.bfloat16)
    torch.library.opcheck(op, (q, k, v, mask, 2, "torch"))
    fp8_op = torch.ops.qdiff.cross_attention_fp8.default
    torch.library.opcheck(fp8_op, (q, k, v, mask, 2, True, "auto"))
    codes, scale = fp8_op(q, k, v, None, 2, False, "torch")
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (40, 144) and scale.shape == (40, 1)


@parent_only
def test_compile_records_one_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v, mask = inputs(2, 20, 12, 2, 72)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ca.cross_attention(*a, 2), backend=backend, fullgraph=True)(q, k, v, mask)
    torch._dynamo.reset()
    names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert names == ["qdiff.cross_attention.default"]
    assert torch.equal(compiled, ca.cross_attention_reference(q, k, v, mask, 2))


@parent_only
def test_gradients_use_the_reference():
    q, k, v, mask = inputs(2, 20, 12, 2, 16)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ca.cross_attention(q, k, v, mask, 2, backend="triton").square().sum().backward()  # the kernel has no autograd
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sdpa(q2, k2, v2, mask, 2).square().sum().backward()
    for got, expected in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@parent_only
def test_tiny_stdit_reference_path_equals_sdpa():
    assert_tiny_stdit_matches_sdpa(compiled=False)


@parent_only
def test_tiny_stdit_compiled_with_the_op_equals_sdpa():
    assert_tiny_stdit_matches_sdpa(compiled=True)


@parent_only
def test_set_cross_attention_rejects_unknown_core():
    with pytest.raises(ValueError, match="cross_attention"):
        set_cross_attention(tiny_model(), "flash")
    with pytest.raises(ValueError, match="cross_attention"):
        compile_blocks(tiny_model(), cross_attention="short_triton")


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@parent_only
def test_triton_kernel_in_child(run_interpreter_child):
    """Runs the `interp` tests below in a child process under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the kernel directly (bench/check_int_kernels.py --only attn_cross)")
    run_interpreter_child(__file__, CHILD_FLAG, passed=32)


@child_only
@pytest.mark.parametrize("config", [(16, 4), (64, 4)])  # neither divides N = 70 or 33
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_interp_kernel_equals_reference(interpreter, config, shape, masked):
    q, k, v, mask = inputs(*shape, masked=masked, seed=shape[1])
    out = ca.cross_attention_triton(q, k, v, mask, shape[3], config=config)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, ca.cross_attention_reference(q, k, v, mask, shape[3]), rtol=1e-5, atol=1e-5)


@child_only
@pytest.mark.parametrize("masked", [False, True])
def test_interp_kernel_bfloat16(interpreter, masked):
    """bf16 in and out; the kernel rounds the probabilities to bf16 before the product with v (relative error
    2^-9 per weight) and the output once: within 2e-2 of the float32 reference, relative to the output's scale."""
    q, k, v, mask = inputs(2, 70, 120, 2, 72, torch.bfloat16, masked=masked)
    out = ca.cross_attention_triton(q, k, v, mask, 2)
    assert out.dtype == torch.bfloat16
    reference = ca.cross_attention_reference(q, k, v, mask, 2).float()
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 2e-2, error


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_interp_fp8_output_is_the_quantized_rows_output(interpreter, dtype, fast, shape):
    """The fused e4m3 output equals the FP8 quantization kernel run on the kernel's bf16 output, bit for bit (same
    attention values, same quantization math), and dequantizes to within e4m3's rounding of the reference."""
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token

    q, k, v, mask = inputs(*shape, dtype=dtype, seed=shape[2])
    codes, scale = ca.cross_attention_fp8_triton(q, k, v, mask, shape[3], fast=fast, config=(16, 4))
    out = ca.cross_attention_triton(q, k, v, mask, shape[3], config=(16, 4))
    expected_codes, expected_scale = quantize_fp8_per_token(out.reshape(-1, out.shape[-1]), backend="triton",
                                                            fast=fast)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (shape[0] * shape[1], shape[3] * shape[4])
    assert scale.dtype == torch.float32 and scale.shape == (shape[0] * shape[1], 1)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    reference = ca.cross_attention_reference(q, k, v, mask, shape[3]).float().reshape(codes.shape)
    error = (codes.float() * scale - reference).abs().max(dim=-1).values
    assert (error <= reference.abs().amax(dim=-1) * 2**-3).all()  # half an e4m3 step of the row's largest value


@child_only
def test_interp_dispatch_and_compiled_op_run_the_kernel(interpreter, monkeypatch):
    calls = []
    kernel = ca.cross_attention_triton
    monkeypatch.setattr(ca, "cross_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k, v, mask = inputs(2, 20, 12, 2, 72)
    eager = ca.cross_attention(q, k, v, mask, 2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ca.cross_attention(*a, 2), backend="aot_eager", fullgraph=True)(q, k, v, mask)
    torch._dynamo.reset()
    assert len(calls) == 2  # auto picks the kernel under the interpreter, eagerly and inside the op
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(eager, ca.cross_attention_reference(q, k, v, mask, 2), rtol=1e-5, atol=1e-5)


@child_only
def test_interp_tiny_stdit_equals_sdpa(interpreter, monkeypatch):
    calls = []
    kernel = ca.cross_attention_triton
    monkeypatch.setattr(ca, "cross_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    assert_tiny_stdit_matches_sdpa(compiled=False)
    assert len(calls) == 2  # both blocks' cross-attention ran the kernel
