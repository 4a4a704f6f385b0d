"""The residual step in front of the fused producer (`qdiff.kernels.fused_producers.Residual`): s = x + gate·y,
written out as the new residual stream, then the producer (none, or LayerNorm + modulate) and the per-token
quantization, FP8 (`quantize_fp8_residual`) and integer (`quantize_per_token_residual`).

CPU: the references run the eager `x + gate * y` ([B, N, K] broadcast, as STDiTBlock does) and then the existing
references; the dispatch picks them on the CPU; the two custom ops pass `torch.library.opcheck` and are what
torch.compile records. The Triton kernels run in a child process under the interpreter (TRITON_INTERPRET=1,
`install_interpreter_shims`): the written s always, and codes and scales equal the references bit for bit, with and
without a gate, with and without LayerNorm + modulate (bfloat16; float32 LayerNorm: torch's moments are summed in
another order, so scales within an ulp and a code moves by one step now and then, as the producer's own tests
allow), float32 and bfloat16, ragged M, row-strided x and y, a chunked (multi-pass: s recomputed in every pass,
written once) and a whole-row tile.

With a per-frame table (`Residual.table`, the temporal attention's `temporal_pos_embed`): the references quantize
u = s + table[frame] with the eager add (`Residual.add_table`) and return s without it; the kernels, on every tile
(the FP8 kernel's tail piece included), give the same codes and write s = x + gate·y bit for bit; the tiny STDiT with
frame-major temporal attention fuses the spatial residual add and the table into the temporal q/k/v quantization in
both blocks (real table, zero table) and gives the unfused output."""
import os
from pathlib import Path

import pytest
import torch

from qdiff.kernels.act_quant import (
    quantize_per_token_reference,
    quantize_per_token_residual,
    quantize_per_token_residual_reference,
)
from qdiff.kernels.fp8_quant import (
    quantize_fp8_per_token_reference,
    quantize_fp8_residual,
    quantize_fp8_residual_reference,
)
from qdiff.kernels.fused_producers import LAYERNORM_MODULATE, NONE, LayerNormModulate, Residual

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_RESIDUAL_QUANT_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
parent_only = pytest.mark.skipif(IN_CHILD, reason="the parent process runs the CPU reference checks")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_kernels_in_child)")

# (ROWS, BLOCK_K, warps): chunked multi-pass, the whole row at once, and (FP8 kernel) K = 72 as 64 + a 16-lane tail
TILES = [(16, 32, 4), (8, 256, 4), (8, 64, 4)]
SHAPES = [(2, 19, 72), (1, 37, 200), (2, 3, 64)]  # (B, N, K): ragged M = B·N; K = 200 chunked by both tiles
# (B, T, S, K, gated): M = B·T·S rows, frame-major; tiles span several frames and end inside one
TABLE_SHAPES = [(2, 4, 5, 72, True), (1, 3, 13, 200, False)]


def inputs(batch, tokens, cols, dtype, gated=True, strided=False, seed=0):
    """x, y [M, K] (row-strided views of wider tensors when `strided`) and the Residual of y with a [B, K] gate."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch * tokens
    width = 2 * cols + 3 if strided else cols
    x = (torch.randn(rows, width, generator=gen) * torch.linspace(0.1, 6, width) + 0.2).to(dtype)[:, :cols]
    y = (torch.randn(rows, width, generator=gen) * 3).to(dtype)[:, 1:cols + 1] if strided else \
        (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    x[0, -1] = 40.0
    gate = (torch.randn(batch, cols, generator=gen) * 0.7).to(dtype) if gated else None
    if gated and strided:  # a chunk of a [B, 6, K] modulation, as STDiTBlock's gates are: rows read in place
        gate = torch.stack([torch.zeros_like(gate)] * 5 + [gate], dim=1)[:, 5]
        assert gate.stride() == (6 * cols, 1)
    return x, Residual(y, gate, tokens)


def table_inputs(batch, frames, per_frame, cols, dtype, gated=True, seed=0):
    """x [M, K] and a Residual with a per-frame table [T, K] (M = B·T·S frame-major rows)."""
    x, residual = inputs(batch, frames * per_frame, cols, dtype, gated, strided=gated, seed=seed)
    table = (torch.randn(frames, cols, generator=torch.Generator().manual_seed(seed + 7)) * 2).to(dtype)
    return x, residual._replace(table=table, rows_per_frame=per_frame)


def layernorm_modulate(batch, tokens, cols, dtype, seed=5):
    """shift and scale [B, K] as chunks of one [B, 6, K] modulation (row stride 6·K), as STDiTBlock passes them."""
    gen = torch.Generator().manual_seed(seed)
    modulation = torch.randn(batch, 6, cols, generator=gen).to(dtype)
    modulation[:, 4] *= 0.3
    return LayerNormModulate(modulation[:, 3], modulation[:, 4], tokens)


def assert_bits_equal(got, expected, name):
    assert got.dtype == expected.dtype and got.shape == expected.shape, name
    if got.dtype == torch.float8_e4m3fn:
        got, expected = got.view(torch.uint8), expected.view(torch.uint8)
    assert torch.equal(got, expected), name


def assert_fp8_result_equal(got, expected):
    for name, a, b in zip(("codes", "scale", "s"), got, expected, strict=True):
        assert_bits_equal(a, b, name)


def assert_close_after_float32_layernorm(got, expected, kind):
    """float32 LayerNorm: torch sums the moments in another order, so a scale may differ in the last bit and a code
    move by one step now and then (as `test_fp8_act_quant` / `test_lowbit_kernels` allow); s stays exact."""
    if kind == "fp8":
        (codes, scale, s), (ref_codes, ref_scale, ref_s) = got, expected
        from qdiff.kernels.fp8_quant import e4m3_steps

        steps = e4m3_steps(codes, ref_codes)
    else:
        (act, s), (ref, ref_s) = got, expected
        codes, scale, ref_codes, ref_scale = act.codes, act.scale, ref.codes, ref.scale
        steps = (codes.int() - ref_codes.int()).abs()
        assert int((act.zero - ref.zero).abs().max()) <= 1
    assert_bits_equal(s, ref_s, "s")
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) <= 5e-3


def assert_int_result_equal(got, expected):
    (act, s), (ref, ref_s) = got, expected
    for name in ("codes", "scale", "zero", "rowsum"):
        assert_bits_equal(getattr(act, name), getattr(ref, name), name)
    assert (act.proj is None) == (ref.proj is None)
    if ref.proj is not None:
        # float32 sums in the kernel's chunk order (64-lane chunks moved one of 37 sums by 1.8e-5)
        torch.testing.assert_close(act.proj, ref.proj, rtol=1e-4, atol=1e-4)
    assert_bits_equal(s, ref_s, "s")


# ------------------------------------------------------------------------------------------ CPU (reference) checks
@parent_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
def test_references_run_the_eager_ops(dtype, gated):
    batch, tokens, cols = 2, 6, 40
    x, residual = inputs(batch, tokens, cols, dtype, gated)
    x3, y3 = x.reshape(batch, tokens, cols), residual.y.reshape(batch, tokens, cols)
    eager = x3 + residual.gate[:, None] * y3 if gated else x3 + y3  # the block's `x + gate_msa * x_s`
    assert torch.equal(residual.apply(x), eager.reshape(x.shape))
    ln = layernorm_modulate(batch, tokens, cols, dtype)
    smooth = torch.rand(cols) + 0.5
    for producer in (None, ln):
        codes, scale = quantize_fp8_per_token_reference(eager.reshape(x.shape), smooth, producer)
        assert_fp8_result_equal(quantize_fp8_residual_reference(x, residual, smooth, producer),
                                (codes, scale, eager.reshape(x.shape)))
        assert_fp8_result_equal(quantize_fp8_residual(x, residual, smooth, producer, backend="auto"),
                                (codes, scale, eager.reshape(x.shape)))  # the CPU: the reference
        act = quantize_per_token_reference(eager.reshape(x.shape), 8, False, smooth, producer=producer)
        assert_int_result_equal(quantize_per_token_residual(x, residual, 8, False, smooth, producer=producer),
                                (act, eager.reshape(x.shape)))


@parent_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_references_run_the_eager_ops(dtype):
    """The producer reads s + table[frame] as the block's `x.view(B, T, S, C) + temporal_pos_embed[:, :, None]`;
    the returned stream is s = x + gate·y without the table."""
    batch, frames, per_frame, cols = 2, 4, 3, 40
    x, residual = table_inputs(batch, frames, per_frame, cols, dtype)
    s = residual.apply(x)
    x3, y3 = x.reshape(batch, -1, cols), residual.y.reshape(batch, -1, cols)
    assert torch.equal(s, (x3 + residual.gate[:, None] * y3).reshape(x.shape))
    u = (s.view(batch, frames, per_frame, cols) + residual.table[None][:, :, None]).view(x.shape)
    assert torch.equal(residual.add_table(s), u) and u.dtype == dtype
    assert residual._replace(table=None).add_table(s) is s
    ln = layernorm_modulate(batch, frames * per_frame, cols, dtype)
    smooth = torch.rand(cols) + 0.5
    for producer in (None, ln):
        codes, scale = quantize_fp8_per_token_reference(u, smooth, producer)
        for backend in ("torch", "auto"):  # the CPU: the reference
            assert_fp8_result_equal(quantize_fp8_residual(x, residual, smooth, producer, backend=backend),
                                    (codes, scale, s))
        assert not torch.equal(codes.view(torch.uint8),
                               quantize_fp8_per_token_reference(s, smooth, producer)[0].view(torch.uint8))
        act = quantize_per_token_reference(u, 8, False, smooth, producer=producer)
        assert_int_result_equal(quantize_per_token_residual(x, residual, 8, False, smooth, producer=producer),
                                (act, s))


def op_args(gated=True, producer=True):
    x, residual = inputs(2, 5, 16, torch.float32, gated)
    ln = layernorm_modulate(2, 5, 16, torch.float32)
    tail = (LAYERNORM_MODULATE, ln.shift, ln.scale, 5, 1e-6) if producer else (NONE, None, None, 1, 0.0)
    return x, residual, tail


@parent_only
def test_opcheck():
    table = torch.randn(5, 16)  # 5 frames of one token each
    for gated, producer, with_table in ((True, True, False), (False, False, False), (True, False, True),
                                        (False, True, True)):
        x, residual, tail = op_args(gated, producer)
        head = (x, residual.y, residual.gate, residual.rows_per_sample, table if with_table else None, 1)
        torch.library.opcheck(torch.ops.qdiff.quantize_fp8_per_token_residual.default,
                              (*head, torch.rand(16) + 0.5, *tail, "auto", False))
        torch.library.opcheck(torch.ops.qdiff.quantize_per_token_residual.default,
                              (*head, 8, False, None, float("nan"), 0.0, torch.randn(2, 16), None, *tail, "auto",
                               False))


def residual_quant(kind, backend, table=None):
    """fn(x, y, gate, shift, scale) of the residual step (+ a [5, K] table: 5 frames of one token) + LayerNorm-modulate
    quantization, FP8 or integer."""
    def quant(x, y, gate, shift, scale):
        residual, producer = Residual(y, gate, 5, table), LayerNormModulate(shift, scale, 5)
        if kind == "fp8":
            return quantize_fp8_residual(x, residual, None, producer, backend=backend)
        act, s = quantize_per_token_residual(x, residual, 8, False, producer=producer, backend=backend)
        return act.codes, act.scale, act.zero, act.rowsum, s
    return quant


@parent_only
@pytest.mark.parametrize("with_table", [False, True])
@pytest.mark.parametrize("kind", ["fp8", "int"])
def test_compiled_dispatch_is_one_op(kind, with_table, recorded_ops):
    x, residual, (_, shift, scale, _, _) = op_args()
    quant = residual_quant(kind, "auto", torch.randn(5, 16) if with_table else None)
    eager, compiled, names = recorded_ops(quant, x, residual.y, residual.gate, shift, scale)
    assert names == [f"qdiff.quantize{'_fp8' if kind == 'fp8' else ''}_per_token_residual"]
    for got, expected in zip(compiled, eager, strict=True):
        assert_bits_equal(got, expected, "compiled")


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@parent_only
def test_kernels_in_child(run_interpreter_child):
    """Runs the `interp` tests below in a child process under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the kernels directly")
    run_interpreter_child(__file__, CHILD_FLAG, passed=3 * 2 * 3 * 2 * 2 + 3 * 2 * 2 * 2 + 5)


@child_only
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fp8", "int"])
@pytest.mark.parametrize("gated", [True, False])
def test_interp_residual_equals_reference(interpreter, tile, shape, dtype, kind, gated):
    """No producer and LayerNorm + modulate; row-strided x and y on the gated runs."""
    batch, tokens, cols = shape
    x, residual = inputs(batch, tokens, cols, dtype, gated, strided=gated)
    assert not gated or x.stride(0) != cols
    for producer in (None, layernorm_modulate(batch, tokens, cols, dtype)):
        kernel_matches_reference(x, residual, producer, tile, kind)


def kernel_matches_reference(x, residual, producer, tile, kind):
    """The Triton kernel (`kind` fp8 or int: A8 with a TQE projection) against its reference, for x [M, K] with the
    residual step in front; returns the kernel's result."""
    from qdiff.kernels.act_quant import quantize_per_token_triton
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token_triton

    if kind == "fp8":
        got = quantize_fp8_per_token_triton(x, None, producer, config=tile, residual=residual)
        expected = quantize_fp8_residual_reference(x, residual, None, producer)
    else:
        kwargs = dict(post_a=torch.randn(1, x.shape[1]), producer=producer)
        got = quantize_per_token_triton(x, 8, False, **kwargs, config=tile, residual=residual)
        expected = quantize_per_token_residual_reference(x, residual, 8, False, **kwargs)
    if producer is not None and x.dtype == torch.float32:
        assert_close_after_float32_layernorm(got, expected, kind)
    else:
        (assert_fp8_result_equal if kind == "fp8" else assert_int_result_equal)(got, expected)
    return got


@child_only
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", TABLE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fp8", "int"])
def test_interp_table_equals_reference(interpreter, tile, shape, dtype, kind):
    """With a per-frame table: the codes of s + table[frame] (no producer and LayerNorm + modulate) as the reference;
    the written s is x + gate·y without the table, bit for bit."""
    batch, frames, per_frame, cols, gated = shape
    x, residual = table_inputs(batch, frames, per_frame, cols, dtype, gated)
    for producer in (None, layernorm_modulate(batch, frames * per_frame, cols, dtype)):
        got = kernel_matches_reference(x, residual, producer, tile, kind)
        assert_bits_equal(got[-1], residual.apply(x), "s")


@child_only
def test_interp_smoothing_and_fast(interpreter):
    """With a smoothing scale after the producer; fast mode: s still exact."""
    from qdiff.kernels.fp8_quant import e4m3_steps, quantize_fp8_per_token_triton

    x, residual = inputs(2, 19, 72, torch.bfloat16)
    producer, smooth = layernorm_modulate(2, 19, 72, torch.bfloat16), torch.rand(72) + 0.5
    expected = quantize_fp8_residual_reference(x, residual, smooth, producer)
    assert_fp8_result_equal(quantize_fp8_per_token_triton(x, smooth, producer, config=TILES[0], residual=residual),
                            expected)
    codes, _, s = quantize_fp8_per_token_triton(x, smooth, producer, config=TILES[0], fast=True, residual=residual)
    assert_bits_equal(s, expected[2], "s")
    assert int(e4m3_steps(codes, expected[0]).max()) <= 1


@child_only
def test_interp_checks_and_empty(interpreter):
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token_triton

    x, residual = inputs(2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="samples x"):
        quantize_fp8_per_token_triton(x, config=TILES[0], residual=residual._replace(rows_per_sample=3))
    with pytest.raises(ValueError, match="residual y"):
        quantize_fp8_per_token_triton(x, config=TILES[0], residual=residual._replace(y=residual.y.bfloat16()))
    codes, scale, s = quantize_fp8_per_token_triton(x[:0], config=TILES[0], residual=Residual(residual.y[:0]))
    assert codes.shape == s.shape == (0, 16) and scale.shape == (0, 1)
    table = torch.randn(4, 16)
    with pytest.raises(ValueError, match="table"):
        quantize_fp8_per_token_triton(x, config=TILES[0], residual=residual._replace(table=table.bfloat16()))
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_fp8_per_token_triton(x, config=TILES[0], residual=residual._replace(table=table, rows_per_frame=3))


@child_only
def test_interp_compiled_op_runs_the_kernel(interpreter, recorded_ops):
    x, residual, (_, shift, scale, _, _) = op_args()
    for kind, table in (("fp8", None), ("int", None), ("fp8", torch.randn(5, 16)), ("int", torch.randn(5, 16))):
        eager, compiled, names = recorded_ops(residual_quant(kind, "triton", table), x, residual.y, residual.gate,
                                              shift, scale)
        assert names == [f"qdiff.quantize{'_fp8' if kind == 'fp8' else ''}_per_token_residual"]
        for got, expected in zip(compiled, eager, strict=True):
            assert_bits_equal(got, expected, "compiled")


def tiny_stdit(yaml, overrides=()):
    """The calibrated tiny STDiT of tests/qdiff/lowbit/test_lowbit_model.py (fake quant) and that module's inputs()."""
    import importlib.util

    from qdiff.config import QuantConfig, apply_overrides

    spec = importlib.util.spec_from_file_location("residual_model_helpers",
                                                  REPO / "tests/qdiff/lowbit/test_lowbit_model.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    _, model = helpers.calibrated(apply_overrides(QuantConfig.from_yaml(REPO / yaml), list(overrides)))
    return model, helpers.inputs()


@child_only
def test_interp_stdit_block_fused_equals_unfused(interpreter):
    """The tiny STDiT as IntLinear on the Triton backend (kernels under the interpreter), bf16, frame-major temporal
    attention: with fusion on, the residual adds in front of integer readers (in each block the temporal q/k/v,
    block 0's with the temporal table added, and cross q) run in the kernel; the output equals the unfused model's
    (every bf16 rounding reproduced)."""
    from qdiff.lowbit import convert_to_int, fused, set_fusion, set_int_backend
    from t2v.models.stdit import set_temporal_attention

    model, (x, t, y, mask) = tiny_stdit("configs/quant/w8a8_ptq.yaml",
                                        ["distill.enabled=false", "act.mode=dynamic_per_token"])
    convert_to_int(model, backend="torch")
    set_int_backend(model, "triton")
    set_temporal_attention(model, "short_triton")
    model.to(torch.bfloat16)
    launches = []
    original = fused.quantize_per_token_residual

    def counting(x, residual, *args, **kwargs):
        launches.append((kwargs["backend"], residual.table is not None))
        return original(x, residual, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "quantize_per_token_residual", counting)
        unfused = model(x, t, y, mask=mask)
        set_fusion(model, True)
        out = model(x, t, y, mask=mask)
    # per block: (a) the temporal q/k/v (block 0: + the table), (b) cross q; (c), the residual + LayerNorm, is not
    # fused for integer readers (qdiff.lowbit.fused.quantize_residual)
    assert launches == [("triton", True), ("triton", False), ("triton", False), ("triton", False)]
    assert torch.equal(out, unfused)


@child_only
def test_interp_stdit_fp8_table_fused_equals_unfused(interpreter):
    """The tiny STDiT as FP8Linear (w8a8_fp8), bf16, frame-major temporal attention, with the compiled blocks' inputs
    (`static_block_inputs`: block 0 the temporal table, block 1 a zero table; block 0 a zero deferred MLP residual
    add, block 1 block 0's), run eagerly: with fusion on, the residual launches run the FP8 kernel (forced: on the CPU
    "auto" takes the reference) and the temporal q/k/v of both blocks read x + table from it; the output equals the
    unfused model's."""
    from qdiff.lowbit import convert_to_int, fused, set_fusion
    from t2v.models.stdit import set_temporal_attention

    model, (x, t, y, mask) = tiny_stdit("configs/quant/w8a8_fp8.yaml")
    convert_to_int(model)
    set_temporal_attention(model, "short_triton")
    model.to(torch.bfloat16)
    model.static_block_inputs = True
    launches = []
    original = fused.quantize_fp8_residual

    def kernel(x, residual, *args, **kwargs):
        launches.append(None if residual.table is None else bool(residual.table.any()))
        return original(x, residual, *args, **{**kwargs, "backend": "triton"})

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "quantize_fp8_residual", kernel)
        unfused = model(x, t, y, mask=mask)
        assert not launches
        set_fusion(model, True)
        out = model(x, t, y, mask=mask)
    # per block: the spatial q/k/v (the deferred MLP residual add + LayerNorm + modulate), the temporal q/k/v (block 0:
    # the real table, block 1: zeros), cross q, fc1 (+ LayerNorm + modulate)
    assert launches == [None, True, None, None, None, False, None, None]
    assert torch.equal(out, unfused)
