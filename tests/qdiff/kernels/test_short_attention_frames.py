"""Frame-major short attention: q, k, v [B, T, S, C] with attention over T at every (b, s) (`qdiff.kernels.
short_attention`), and STDiT's temporal branch on it (`Attention.forward_frames`, no permute copies).

CPU (reference) checks: the 4-D reference is the 3-D one per position; shapes are checked; the custom op passes
opcheck and torch.compile records it with 4-D inputs; which layers let the block go frame-major
(`row_order_free`, `Attention.runs_frame_major`) and that the others take the permute path. The Triton kernel runs in
a child process under TRITON_INTERPRET=1 (as in test_short_attention.py): it equals the reference on strided views of
merged [B, T, S, 3C] tensors, ragged T and problem counts no program size divides, and an STDiT block gives
bit-identical output frame-major and through the permute path."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.kernels import short_attention as sa
from qdiff.layers.quant_linear import QuantLinear
from qdiff.lowbit.fp8_linear import FP8Linear
from qdiff.lowbit.int_linear import IntLinear
from qdiff.quantizers.config import ActQuantConfig, TQEConfig, WeightQuantConfig
from t2v.models.stdit import STDiT, compile_blocks, merge_qkv, row_order_free, set_temporal_attention
from t2v.pipeline.build import randomize_zero_init

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_SHORT_ATTENTION_FRAMES_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
parent_only = pytest.mark.skipif(IN_CHILD, reason="the parent process runs the CPU reference checks")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_frames_in_child)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# T = 16 frames, S = 4 positions, 2 heads of 72: the temporal attention is [2, 16, 4, 144] frame-major
TINY = dict(input_size=(16, 4, 4), hidden_size=144, depth=2, num_heads=2, caption_channels=32, model_max_length=8)
T, S, C = 16, 4, 144


def merged_views(batch, seq, spatial, heads, head_dim, dtype=torch.float32, seed=0):
    """q, k, v [B, T, S, C]: the three chunks of one [B, T, S, 3C] tensor (token stride 3C), as merged qkv gives."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, seq, spatial, 3 * heads * head_dim, generator=gen) * 1.5).to(dtype)
    return qkv.chunk(3, dim=-1)


def per_position(t):
    """[B, T, S, C] -> [B·S, T, C] (the permute path's rows)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1])


def tiny_model():
    torch.manual_seed(0)
    return randomize_zero_init(STDiT(**TINY).eval())


def block_inputs(seed=1):
    """x [2, T·S, C], packed text y [1, 11, C] with lengths [8, 3], t0 [2, 6C], the temporal table [1, T, C]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T * S, C, generator=gen)
    y = torch.randn(1, 11, C, generator=gen)
    t0 = torch.randn(2, 6 * C, generator=gen) * 0.1
    table = torch.randn(1, T, C, generator=gen)
    return x, y, t0, [8, 3], table


def both_paths(block, *inputs):
    """(frame-major output, permute-path output, calls of forward_frames) of one no-grad block forward each."""
    attn, calls = block.attn_temp, []
    forward_frames = attn.forward_frames
    attn.forward_frames = lambda x4: calls.append(tuple(x4.shape)) or forward_frames(x4)
    try:
        with torch.no_grad():
            attn.frame_major = True  # also for nn.Linear ("auto" takes it for low-bit layers only)
            frames = block(*inputs)
            attn.frame_major = False
            permuted = block(*inputs)
    finally:
        attn.frame_major = "auto"
        del attn.forward_frames
    return frames, permuted, calls


def int_layer(frames=False, static=False, seed=0):
    """An IntLinear [C -> C] with random W8A8 codes: per-token or static per-tensor activations; with frames, a TQE
    post term with per-frame factors (its output depends on each row's frame index)."""
    gen = torch.Generator().manual_seed(seed)
    layer = IntLinear(C, C, 8, 8, act_mode="static_per_tensor" if static else "dynamic_per_token",
                      num_frames=T if frames else None, rank_out=1 if frames else 0, backend="torch")
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-128, 128, (C, C), generator=gen, dtype=torch.int8))
        layer.w_scale.fill_(1e-3)
        layer.bias.normal_(0, 0.1, generator=gen)
        if static:
            layer.act_static.copy_(torch.tensor([0.05, 3.0]))
        if frames:
            for buffer in (layer.post_a, layer.post_b, layer.frame_scale):
                buffer.normal_(0, 0.1, generator=gen)
    return layer


def quant_layer(tqe=None, frames=None, **act):
    """A QuantLinear [C -> C] over a random nn.Linear (8-bit weights, 8-bit activations with `act`)."""
    return QuantLinear.from_linear(nn.Linear(C, C), WeightQuantConfig(bits=8), ActQuantConfig(bits=8, **act), tqe,
                                   num_frames=frames)


# ------------------------------------------------------------------------------------------ CPU (reference) checks
@parent_only
@pytest.mark.parametrize("seq,spatial", [(16, 4), (5, 3), (32, 1)])
def test_reference_4d_is_the_3d_reference_per_position(seq, spatial):
    q, k, v = merged_views(3, seq, spatial, 2, 72)
    out = sa.short_attention_reference(q, k, v, 2)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    expected = sa.short_attention_reference(*map(per_position, (q, k, v)), 2)  # [B·S, T, C]
    torch.testing.assert_close(per_position(out), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(sa.short_attention(q, k, v, 2), out)  # CPU dispatch: the reference


@parent_only
def test_4d_arguments_are_checked():
    q, k, v = merged_views(2, 16, 3, 2, 16)
    with pytest.raises(ValueError, match="one shape"):
        sa.short_attention(q, k[:, :, :2], v, 2)
    with pytest.raises(ValueError, match="one shape"):
        sa.short_attention(q[None], k[None], v[None], 2)  # 5-D
    with pytest.raises(ValueError, match="one shape"):
        sa.short_attention(q[0, 0], k[0, 0], v[0, 0], 2)  # 2-D
    with pytest.raises(ValueError, match="divisible"):
        sa.short_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="N = 33"):
        sa.short_attention_triton(*merged_views(1, 33, 2, 2, 16), 2)


@parent_only
def test_opcheck_4d():
    op = torch.ops.qdiff.short_attention.default
    torch.library.opcheck(op, (*merged_views(2, 5, 3, 2, 16), 2, "auto"))
    torch.library.opcheck(op, (*merged_views(1, 16, 4, 2, 72, torch.bfloat16), 2, "torch"))


@parent_only
def test_gradients_4d_use_the_reference():
    q, k, v = (t.detach().requires_grad_() for t in merged_views(2, 8, 3, 2, 16))
    sa.short_attention(q, k, v, 2, backend="triton").square().sum().backward()
    q2, k2, v2 = (per_position(t).detach().requires_grad_() for t in (q, k, v))
    sa.short_attention_reference(q2, k2, v2, 2).square().sum().backward()
    for got, expected in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(per_position(got), expected, rtol=1e-5, atol=1e-6)


@parent_only
def test_row_order_free_layers():
    assert row_order_free(nn.Linear(C, C))
    assert row_order_free(int_layer()) and row_order_free(int_layer(static=True))
    assert not row_order_free(int_layer(frames=True))  # per-frame TQE factor m_t
    assert row_order_free(FP8Linear(C, C))
    assert not row_order_free(FP8Linear(C, C, num_frames=T, rank_out=1))
    assert row_order_free(quant_layer()) and row_order_free(quant_layer(mode="static_per_tensor"))
    assert row_order_free(quant_layer(TQEConfig(rank=4, rank_out=1, frame_scale=False), frames=T))
    assert not row_order_free(quant_layer(TQEConfig(rank=4, rank_out=1), frames=T))  # frame_scale
    assert not row_order_free(quant_layer(reference_token_grouping=True))  # ranges shared across the batch
    observing = quant_layer()
    observing.observe_act_stats = True  # a per-sample max over the frame axis
    assert not row_order_free(observing)
    hooked = nn.Linear(C, C)
    hooked.register_forward_hook(lambda *a: None)
    assert not row_order_free(hooked)
    assert not row_order_free(nn.Identity())  # unknown layers count as order-dependent


@parent_only
def test_runs_frame_major_switches():
    attn = tiny_model().blocks[0].attn_temp
    x = torch.zeros(1, T * S, C)
    assert not attn.runs_frame_major(x)  # core "sdpa"
    attn.core = "short_triton"
    assert not attn.runs_frame_major(x)  # nn.Linear parameters require grad and grad mode is on
    with torch.no_grad():
        assert not attn.runs_frame_major(x)  # "auto": float q/k/v stay on the permute path (measured faster compiled)
        attn.frame_major = True
        assert attn.runs_frame_major(x)
        attn.frame_major = False
        assert not attn.runs_frame_major(x)
        attn.frame_major = "auto"
        for i, name in enumerate(("q", "k", "v")):
            setattr(attn, name, int_layer(seed=i))
        assert attn.runs_frame_major(x)  # "auto" with low-bit q/k/v
        attn.proj = int_layer(frames=True)  # every linear counts, proj too
        assert not attn.runs_frame_major(x)
        attn.proj = int_layer()
        assert attn.runs_frame_major(x)
        merge_qkv(attn)
        assert attn.qkv is not None and attn.runs_frame_major(x)


@parent_only
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("with_table", [True, False])
def test_block_frame_major_equals_permute_path_reference(merged, with_table):
    """On the CPU the attention is the reference: the two paths agree (the child checks the kernel bit for bit)."""
    block = set_temporal_attention(tiny_model(), "short_triton").blocks[0]
    if merged:
        merge_qkv(block)
    x, y, t0, lens, table = block_inputs()
    frames, permuted, calls = both_paths(block, x, y, t0, lens, table if with_table else None)
    assert calls == [(2, T, S, C)]
    torch.testing.assert_close(frames, permuted, rtol=1e-6, atol=1e-6)


@parent_only
@pytest.mark.parametrize("static", [False, True])
def test_block_with_integer_layers_is_bit_identical(static):
    """Integer temporal linears (per-token or static per-tensor activations) give the same rows in either order."""
    block = set_temporal_attention(tiny_model(), "short_triton").blocks[0]
    for i, name in enumerate(("q", "k", "v", "proj")):
        setattr(block.attn_temp, name, int_layer(static=static, seed=i))
    frames, permuted, calls = both_paths(block, *block_inputs())
    assert calls == [(2, T, S, C)]
    assert torch.equal(frames, permuted)


@parent_only
@pytest.mark.parametrize("layer", ["int_frames", "quant_frames", "grouping", "grad"])
def test_block_falls_back_to_the_permute_path(layer):
    block = set_temporal_attention(tiny_model(), "short_triton").blocks[0]
    attn = block.attn_temp
    attn.frame_major = True  # not "auto", which keeps the float q/k/v here on the permute path anyway
    if layer == "int_frames":
        attn.v = int_layer(frames=True)
    elif layer == "quant_frames":
        attn.proj = quant_layer(TQEConfig(rank=4, rank_out=1), frames=T)
    elif layer == "grouping":
        attn.q = quant_layer(reference_token_grouping=True)
    x, y, t0, lens, table = block_inputs()
    attn.forward_frames = lambda x4: pytest.fail("forward_frames ran")
    if layer == "grad":
        block(x, y, t0, lens, table).sum().backward()  # parameters require grad: the permute path
        return
    with torch.no_grad():
        assert not attn.runs_frame_major(x)
        out = block(x, y, t0, lens, table)
    assert out.shape == x.shape and torch.isfinite(out).all()


@parent_only
def test_compiled_block_records_the_4d_op():
    """compile_blocks with "short_triton": one graph for both blocks, the op on frame-major [B, T, S, C] inputs;
    the output equals the eager frame-major model's."""
    graphs = []

    def backend(gm, example_inputs):  # aot_eager, keeping the graphs dynamo hands over
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, example_inputs)

    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 16, 4, 4, generator=gen), torch.randn(2, 1, 8, 32, generator=gen)
    t = torch.tensor([999, 400])
    set_temporal_attention(model, "short_triton")
    for block in model.blocks:
        block.attn_temp.frame_major = True  # float q/k/v: "auto" would keep the permute path
    with torch.no_grad():
        eager = model(x, t, y)
    torch._dynamo.reset()
    compile_blocks(model, temporal_attention="short_triton", backend=backend, compile_ends=False)  # blocks only
    try:
        with torch.no_grad():
            compiled = model(x, t, y)
    finally:
        compile_blocks(model, enabled=False)
        torch._dynamo.reset()
    assert len(graphs) == 1
    ops = [n for n in graphs[0].graph.nodes if str(n.target) == "qdiff.short_attention.default"]
    assert len(ops) == 1 and tuple(ops[0].args[0].meta["example_value"].shape) == (2, T, S, C)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@parent_only
def test_frames_in_child(run_interpreter_child):
    """Runs the `interp` tests below in a child process under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the kernel directly (bench/check_int_kernels.py --only attn_short)")
    run_interpreter_child(__file__, CHILD_FLAG, passed=14)


@child_only
@pytest.mark.parametrize("config", [(1, 1), (4, 4)])  # 3 x 5 positions x 3 heads = 45 problems: 4 does not divide
@pytest.mark.parametrize("seq", [5, 16])
@pytest.mark.parametrize("head_dim", [72, 16])
def test_interp_4d_kernel_equals_reference(interpreter, config, seq, head_dim):
    q, k, v = merged_views(3, seq, 5, 3, head_dim, seed=seq + head_dim)
    assert q.stride() == (seq * 5 * 9 * head_dim, 5 * 9 * head_dim, 9 * head_dim, 1)  # views of [B, T, S, 3C]
    out = sa.short_attention_triton(q, k, v, 3, config=config)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, sa.short_attention_reference(q, k, v, 3), rtol=1e-5, atol=1e-5)


@child_only
def test_interp_4d_kernel_other_layouts_and_the_3d_case(interpreter):
    """Position-major memory [B, S, T, C] read as [B, T, S, C]; contiguous tensors; half precision; [B', N, C] is
    the unit-S case bit for bit."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 7, 16, 144, generator=gen).transpose(1, 2) for _ in range(3))  # [2, 16, 7, 144]
    torch.testing.assert_close(sa.short_attention_triton(q, k, v, 2), sa.short_attention_reference(q, k, v, 2),
                               rtol=1e-5, atol=1e-5)
    q, k, v = (t.contiguous() for t in (q, k, v))
    torch.testing.assert_close(sa.short_attention_triton(q, k, v, 2, config=(2, 2)),
                               sa.short_attention_reference(q, k, v, 2), rtol=1e-5, atol=1e-5)
    half = merged_views(2, 16, 3, 2, 72, torch.bfloat16)
    out = sa.short_attention_triton(*half, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sa.short_attention_reference(*half, 2).float(), rtol=2e-2, atol=2e-2)
    rows = [per_position(t) for t in merged_views(2, 16, 3, 2, 72)]  # [6, 16, 144] strided views
    three = sa.short_attention_triton(*rows, 2)
    assert three.shape == (6, 16, 144) and three.is_contiguous()
    assert torch.equal(three, sa.short_attention_triton(*(t.unsqueeze(2) for t in rows), 2)[:, :, 0])


@child_only
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("with_table", [True, False])
def test_interp_block_frame_major_is_bit_identical(interpreter, monkeypatch, merged, with_table):
    """The same kernel math per (b, s, head) problem and row-order-free linears: the frame-major block output equals
    the permute path's bit for bit."""
    shapes = []
    kernel = sa.short_attention_triton
    monkeypatch.setattr(sa, "short_attention_triton", lambda q, *a, **kw: shapes.append(q.dim()) or kernel(q, *a, **kw))
    block = set_temporal_attention(tiny_model(), "short_triton").blocks[0]
    if merged:
        assert not merge_qkv(block) and block.attn_temp.qkv is not None
    x, y, t0, lens, table = block_inputs()
    frames, permuted, calls = both_paths(block, x, y, t0, lens, table if with_table else None)
    assert calls == [(2, T, S, C)] and shapes == [4, 3]  # the kernel ran on both paths
    assert torch.equal(frames, permuted)


@child_only
def test_interp_fallback_block_runs_the_3d_kernel(interpreter, monkeypatch):
    shapes = []
    kernel = sa.short_attention_triton
    monkeypatch.setattr(sa, "short_attention_triton", lambda q, *a, **kw: shapes.append(q.dim()) or kernel(q, *a, **kw))
    block = set_temporal_attention(tiny_model(), "short_triton").blocks[0]
    block.attn_temp.frame_major = True  # the float q/k/v would keep "auto" on the permute path
    block.attn_temp.proj = int_layer(frames=True)
    x, y, t0, lens, table = block_inputs()
    with torch.no_grad():
        out = block(x, y, t0, lens, table)
        block.attn_temp.proj = int_layer()
        frames = block(x, y, t0, lens, table)
    assert shapes == [3, 4] and out.shape == frames.shape == x.shape
