"""Short-sequence attention (`qdiff.kernels.short_attention`, STDiT's temporal attention): the PyTorch reference
equals SDPA; the custom op passes `torch.library.opcheck` and is what torch.compile records; gradients fall back to
the reference; a tiny STDiT with its temporal attention on "short_triton" gives the SDPA model's output, its linears
seeing the same inputs. The Triton kernel itself runs in a child process under Triton's CPU interpreter
(TRITON_INTERPRET=1 must be set before triton is imported): it equals the reference in float32 for ragged sequence
lengths, head sizes, problem counts and strided q/k/v views, and drives the tiny STDiT, eager and compiled."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qdiff.kernels import short_attention as sa
from t2v.models.stdit import STDiT, compile_blocks, set_temporal_attention
from t2v.pipeline.build import randomize_zero_init

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_SHORT_ATTENTION_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
parent_only = pytest.mark.skipif(IN_CHILD, reason="the parent process runs the CPU reference checks")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_triton_kernel_in_child)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# T = 16 frames, S = 4 tokens per frame, 2 heads of 72 (XL/2's head size): the temporal attention is [8, 16, 144]
TINY = dict(input_size=(16, 4, 4), hidden_size=144, depth=2, num_heads=2, caption_channels=32, model_max_length=8)
SEQS, HEAD_DIMS = (16, 8, 5, 32), (72, 64, 16)


def qkv_views(rows, seq, heads, head_dim, dtype=torch.float32, seed=0):
    """q, k, v [rows, seq, heads·head_dim]: slices of one [rows, seq, 3C] tensor (row stride 3·seq·C, token stride
    3C), as a fused qkv linear would give them."""
    gen = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    qkv = (torch.randn(rows, seq, 3 * channels, generator=gen) * 1.5).to(dtype)
    return qkv.split(channels, dim=-1)


def sdpa(q, k, v, heads):
    """F.scaled_dot_product_attention on [B', h, N, d] views, back to [B', N, C]."""
    rows, seq, channels = q.shape

    def split(t):
        return t.reshape(rows, seq, heads, channels // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(rows, seq, channels)


def tiny_model():
    torch.manual_seed(0)
    return randomize_zero_init(STDiT(**TINY).eval())


def tiny_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 4, 4, generator=gen)
    y = torch.randn(2, 1, 8, 32, generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[-1, 5:] = 0
    return x, torch.tensor([999, 400]), y, mask


def linear_inputs(model, x, t, y, mask, hooks=True):
    """(model output, {temporal linear name: list of the inputs it saw}) of one no-grad forward."""
    seen, handles = {}, []
    for i, block in enumerate(model.blocks if hooks else ()):
        for name in ("q", "k", "v", "proj"):
            key = f"blocks.{i}.attn_temp.{name}"
            handles.append(getattr(block.attn_temp, name).register_forward_hook(
                lambda m, args, out, key=key: seen.setdefault(key, []).append(args[0].detach().clone())))
    with torch.no_grad():
        out = model(x, t, y, mask=mask)
    for handle in handles:
        handle.remove()
    return out, seen


def assert_tiny_stdit_matches_sdpa(compiled: bool):
    """The tiny STDiT with temporal core "short_triton" equals it with SDPA: eager, with the temporal linears seeing
    the inputs they see with SDPA; or compiled (aot_eager), one graph for both blocks with the op in it."""
    model = tiny_model()
    x, t, y, mask = tiny_inputs()
    reference, seen_sdpa = linear_inputs(model, x, t, y, mask)
    graphs = []
    if compiled:
        def backend(gm, example_inputs):  # aot_eager, keeping the graphs dynamo hands over
            graphs.append(gm)
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

        torch._dynamo.reset()
        compile_blocks(model, temporal_attention="short_triton", backend=backend, compile_ends=False)  # blocks only
    else:
        set_temporal_attention(model, "short_triton")
    assert all(b.attn_temp.core == "short_triton" and b.attn.core == "sdpa" for b in model.blocks)
    out, seen = linear_inputs(model, x, t, y, mask, hooks=not compiled)  # hooks would recompile per block
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    if compiled:
        assert len(graphs) == 1  # both blocks, no graph break
        names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
        assert names.count("qdiff.short_attention.default") == 1, names
        compile_blocks(model, enabled=False)  # back to eager SDPA
        torch._dynamo.reset()
        assert all(b.attn_temp.core == "sdpa" for b in model.blocks)
        return
    assert seen.keys() == seen_sdpa.keys() and len(seen) == 8
    for key, inputs in seen.items():  # [B·S, T, C]: the first block's q, k, v the same tensor; the rest close
        for got, expected in zip(inputs, seen_sdpa[key], strict=True):
            assert got.shape == expected.shape == (2 * 4, 16, 144), key
            if key.startswith("blocks.0.") and not key.endswith("proj"):
                assert torch.equal(got, expected), key
            else:
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ CPU (reference) checks
@parent_only
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_reference_equals_sdpa(seq, head_dim):
    q, k, v = qkv_views(5, seq, 3, head_dim)
    assert not q.is_contiguous()
    out = sa.short_attention_reference(q, k, v, 3)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    torch.testing.assert_close(out, sdpa(q, k, v, 3), rtol=1e-5, atol=1e-5)


@parent_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_in_half_precision(dtype):
    q, k, v = qkv_views(4, 16, 2, 72, dtype)
    out = sa.short_attention_reference(q, k, v, 2)
    assert out.dtype == dtype
    expected = sdpa(q.float(), k.float(), v.float(), 2)  # float32 math, one rounding at the end: within one ulp
    torch.testing.assert_close(out.float(), expected, rtol=2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10,
                               atol=1e-6)


@parent_only
def test_cpu_dispatch_is_the_reference():
    q, k, v = qkv_views(3, 16, 4, 16)
    assert not sa.triton_available("cpu") or sa.interpret_mode()
    assert torch.equal(sa.short_attention(q, k, v, 4), sa.short_attention_reference(q, k, v, 4))
    assert torch.equal(sa.short_attention(q, k, v, 4, backend="torch"), sa.short_attention_reference(q, k, v, 4))


@parent_only
def test_arguments_are_checked():
    q, k, v = qkv_views(2, 16, 2, 16)
    with pytest.raises(ValueError, match="one shape"):
        sa.short_attention(q, k[:, :8], v, 2)
    with pytest.raises(ValueError, match="divisible"):
        sa.short_attention(q, k, v, 3)
    with pytest.raises(TypeError, match="float32"):
        sa.short_attention(q, k.double(), v, 2)
    with pytest.raises(ValueError, match="backend"):
        sa.short_attention(q, k, v, 2, backend="cuda")
    long = qkv_views(1, 33, 2, 16)
    with pytest.raises(ValueError, match="N = 33"):
        sa.short_attention_triton(*long, 2)
    torch.testing.assert_close(sa.short_attention(*long, 2), sdpa(*long, 2), rtol=1e-5, atol=1e-5)  # auto: reference


@parent_only
def test_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch checks of the op (CPU implementation)."""
    q, k, v = qkv_views(3, 5, 2, 16)
    op = torch.ops.qdiff.short_attention.default
    torch.library.opcheck(op, (q, k, v, 2, "auto"))
    torch.library.opcheck(op, (*qkv_views(2, 16, 2, 72, torch.bfloat16), 2, "torch"))


@parent_only
def test_compile_records_one_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = qkv_views(3, 16, 2, 72)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: sa.short_attention(*a, 2), backend=backend, fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    names = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert names == ["qdiff.short_attention.default"]
    assert torch.equal(compiled, sa.short_attention_reference(q, k, v, 2))


@parent_only
def test_gradients_use_the_reference():
    q, k, v = (t.detach().requires_grad_() for t in qkv_views(3, 16, 2, 16))
    sa.short_attention(q, k, v, 2, backend="triton").square().sum().backward()  # never the kernel: no autograd there
    grads = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sdpa(q2, k2, v2, 2).square().sum().backward()
    for got, expected in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@parent_only
def test_tiny_stdit_reference_path_equals_sdpa():
    assert_tiny_stdit_matches_sdpa(compiled=False)


@parent_only
def test_tiny_stdit_compiled_with_the_op_equals_sdpa():
    assert_tiny_stdit_matches_sdpa(compiled=True)


@parent_only
def test_set_temporal_attention_rejects_unknown_core():
    with pytest.raises(ValueError, match="temporal_attention"):
        set_temporal_attention(tiny_model(), "flash")


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@parent_only
def test_triton_kernel_in_child(run_interpreter_child):
    """Runs the `interp` tests below in a child process under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the kernel directly (bench/check_int_kernels.py --only attn_short)")
    run_interpreter_child(__file__, CHILD_FLAG, passed=30)


@child_only
@pytest.mark.parametrize("config", [(1, 4), (4, 4)])  # 7 rows x 3 heads = 21 problems: 4 does not divide them
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_interp_kernel_equals_reference(interpreter, config, seq, head_dim):
    q, k, v = qkv_views(7, seq, 3, head_dim, seed=seq + head_dim)
    out = sa.short_attention_triton(q, k, v, 3, config=config)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, sa.short_attention_reference(q, k, v, 3), rtol=1e-5, atol=1e-5)


@child_only
def test_interp_kernel_other_layouts(interpreter):
    """Token-major views ([N, B', C] memory read as [B', N, C]: row stride C), a padded channel dimension, and a
    non-unit channel stride (copied by the wrapper)."""
    gen = torch.Generator().manual_seed(3)
    rows, seq, heads, head_dim = 6, 16, 2, 72
    channels = heads * head_dim
    q, k, v = (torch.randn(seq, rows, channels, generator=gen).transpose(0, 1) for _ in range(3))
    expected = sa.short_attention_reference(q, k, v, heads)
    torch.testing.assert_close(sa.short_attention_triton(q, k, v, heads), expected, rtol=1e-5, atol=1e-5)
    padded = torch.randn(rows, seq, channels + 8, generator=gen)[..., :channels]
    out = sa.short_attention_triton(padded, k, v, heads, config=(2, 2))
    torch.testing.assert_close(out, sa.short_attention_reference(padded, k, v, heads), rtol=1e-5, atol=1e-5)
    wide = torch.randn(rows, seq, 2 * channels, generator=gen)[..., ::2]
    out = sa.short_attention_triton(wide, k, v, heads)
    torch.testing.assert_close(out, sa.short_attention_reference(wide, k, v, heads), rtol=1e-5, atol=1e-5)


@child_only
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_interp_kernel_half_precision(interpreter, dtype, tolerance):
    """bf16/fp16 in and out; the kernel rounds the probabilities to the input dtype before the product with v."""
    q, k, v = qkv_views(5, 16, 2, 72, dtype)
    out = sa.short_attention_triton(q, k, v, 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), sa.short_attention_reference(q, k, v, 2).float(), rtol=tolerance,
                               atol=tolerance)


@child_only
def test_interp_dispatch_and_compiled_op_run_the_kernel(interpreter, monkeypatch):
    calls = []
    kernel = sa.short_attention_triton
    monkeypatch.setattr(sa, "short_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k, v = qkv_views(3, 16, 2, 72)
    eager = sa.short_attention(q, k, v, 2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: sa.short_attention(*a, 2), backend="aot_eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    assert len(calls) == 2  # auto picks the kernel under the interpreter, eagerly and inside the op
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(eager, sa.short_attention_reference(q, k, v, 2), rtol=1e-5, atol=1e-5)


@child_only
@pytest.mark.parametrize("compiled", [False, True])
def test_interp_tiny_stdit_equals_sdpa(interpreter, monkeypatch, compiled):
    calls = []
    kernel = sa.short_attention_triton
    monkeypatch.setattr(sa, "short_attention_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    assert_tiny_stdit_matches_sdpa(compiled)
    assert len(calls) == 2  # both blocks' temporal attention ran the kernel (the compiled graph: both calls too)

