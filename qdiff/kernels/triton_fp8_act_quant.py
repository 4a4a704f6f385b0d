"""Triton kernel of `qdiff.kernels.fp8_quant.quantize_fp8_per_token` (imported lazily by its wrapper; the math is
there): per token row of x [M, K], the fused producer and smoothing of the integer kernel (`triton_act_quant`'s
`_produce`, the same float32 math and roundings to x's dtype), then s = max(absmax, 1e-12) / 448 and the e4m3 codes
of clamp(v / s, ±448), stored as float8_e4m3fn [M, K] with s float32 [M].

The cast float32 -> tl.float8e4nv rounds to nearest even (on sm_89+ one `cvt.rn.satfinite.e4m3x2.f32` per two
values; torch's `.to(torch.float8_e4m3fn)` rounds the same way); the clamp before it makes saturation irrelevant.
Triton's CPU interpreter (3.6 to 3.9) rounds this cast half away from zero and carries a rounded-up mantissa into
the wrong bits: `bench.check_int_kernels.install_interpreter_shims` makes it cast as the GPU does.

Same layout rules as the integer kernel (module docstring of `triton_act_quant`): 2-D tensors, reductions along
axis 1 and none inside a loop, the chunk loops carry an element-wise [ROWS, BLOCK_K] maximum.

With LayerNorm + modulate the wrapper launches it with `enable_fp_fusion=False`. With fusion on (Triton's default),
LLVM narrows the modulation's float32 product and sum of bf16 values, each rounded to bf16, to bf16 operations and
contracts them into one `fma.rn.bf16` on sm_90: the product is no longer rounded before the shift is added, as the
eager model rounds it, and 3% of the codes of a bf16 input moved (by up to 50 e4m3 steps near zero) on an H100.
Without fusion each op keeps its rounding (`mul.rn.bf16`, `add.rn.bf16`). The other producers keep fusion: nothing
there rounds between a product and a sum, and GELU's polynomial runs 10% faster with fma. The residual step
(`_load_input`: s = x + gate·y rounded after the product and after the sum, as the eager `x + gate * y`) is
launched without fusion too, whatever the producer. With a per-frame table (`_add_table`, TABLE) the kernel writes s
and feeds the producer u = s + table[(m // rows_per_frame) % T], rounded to x's dtype after the add as the eager
`x + temporal_pos_embed` is; every pass that recomputes s (moments, absmax, codes; both pieces of a whole row) adds it.
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode
from qdiff.kernels.triton_act_quant import (
    AUTOTUNE_CONFIGS,
    LAYERNORM_MODULATE,
    _add_table,
    _chunk_moments,
    _load_input,
    _produce,
    _row_moments,
    _store_residual,
    prune_configs,
    tail_width,
)

INTERPRETED = interpret_mode()
FP8_MAX = tl.constexpr(448.0)  # the largest finite float8_e4m3fn
MIN_ABSMAX = tl.constexpr(1e-12)


@triton.jit
def _row_scale(absmax):
    """s [ROWS] = max(absmax, 1e-12) / 448 with IEEE division, as `fp8_row_scale`."""
    return tl.math.div_rn(tl.maximum(absmax, MIN_ABSMAX), FP8_MAX)


@triton.jit
def _store_codes(v, valid, rows, cols, scale, codes_ptr, stride_cm, FAST: tl.constexpr):
    """Store e4m3(clamp(v / s, ±448)) of one [ROWS, BLOCK_K] chunk v (float32)."""
    if FAST:  # one reciprocal per row instead of a division per element; a code may move by one step on a tie
        q = v * (1.0 / scale)[:, None]
    else:
        q = tl.math.div_rn(v, scale[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    tl.store(codes_ptr + rows[:, None] * stride_cm + cols[None, :], q.to(tl.float8e4nv), mask=valid)


@triton.jit
def _split_moments(x, valid, x_tail, tail_valid, K, eps):
    """LayerNorm (mean, rstd) [ROWS] of rows held whole in two pieces x [ROWS, BLOCK_K] and x_tail [ROWS, TAIL_K]
    (x's dtype; 0 outside their masks)."""
    width = K * 1.0
    x32, tail32 = x.to(tl.float32), x_tail.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x32, axis=1) + tl.sum(tail32, axis=1), width)
    dev = tl.where(valid, x32 - mean[:, None], 0.0)
    tail_dev = tl.where(tail_valid, tail32 - mean[:, None], 0.0)
    variance = tl.math.div_rn(tl.sum(dev * dev, axis=1) + tl.sum(tail_dev * tail_dev, axis=1), width)
    return mean, 1.0 / tl.sqrt_rn(variance + eps)


@triton.jit
def fp8_act_quant_kernel(
    x_ptr, s_ptr, shift_ptr, mscale_ptr, codes_ptr, scale_ptr, y_ptr, gate_ptr, out_ptr, table_ptr, M, K, stride_xm,
    stride_cm, rows_per_sample, stride_mod, eps, stride_ym, stride_om, gate_rows_per_sample, stride_gate,
    table_rows_per_frame, table_frames,
    SMOOTH: tl.constexpr, PRODUCER: tl.constexpr, ONE_CHUNK: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr, FAST: tl.constexpr, RESIDUAL: tl.constexpr, TAIL_K: tl.constexpr, TABLE: tl.constexpr,
    HW_TANH: tl.constexpr,
):
    """ONE_CHUNK (K ≤ BLOCK_K + TAIL_K): the row is read once, as one BLOCK_K piece and, TAIL_K > 0, a TAIL_K piece
    after it (`tail_width`). Else two passes over K in chunks (the re-read hits L2), after the LayerNorm moments when
    producer 1 is fused: the absmax, then the codes. RESIDUAL (1: x + y, 2: x + gate·y): every pass recomputes s
    from x, y (and the gate) instead of reading x; the codes pass writes s to out_ptr. TABLE: the producer reads
    s + table[frame] (`_add_table`, after s is written) in every pass, in both pieces of a whole row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < M
    sample = rows // rows_per_sample
    gate_row = (rows // gate_rows_per_sample) * stride_gate
    mean = tl.zeros([ROWS], dtype=tl.float32)
    rstd = tl.zeros([ROWS], dtype=tl.float32)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
        _store_residual(x, out_ptr, rows, cols, valid, stride_om, RESIDUAL)
        x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
        if TAIL_K > 0:  # the rest of the row: [ROWS, TAIL_K] at column BLOCK_K
            tail_cols = BLOCK_K + tl.arange(0, TAIL_K)
            tail_valid = row_ok[:, None] & (tail_cols < K)[None, :]
            x_tail = _load_input(x_ptr, y_ptr, gate_ptr, rows, tail_cols, tail_valid, stride_xm, stride_ym, gate_row,
                                 RESIDUAL)
            _store_residual(x_tail, out_ptr, rows, tail_cols, tail_valid, stride_om, RESIDUAL)
            x_tail = _add_table(x_tail, table_ptr, rows, tail_cols, tail_valid, K, table_rows_per_frame, table_frames,
                                TABLE)
        if PRODUCER == LAYERNORM_MODULATE:
            if TAIL_K > 0:
                mean, rstd = _split_moments(x, valid, x_tail, tail_valid, K, eps)
            else:
                mean, rstd = _chunk_moments(x, valid, K, eps)
        v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd, SMOOTH,
                     PRODUCER, FAST, HW_TANH)
        absmax = tl.max(tl.abs(v), axis=1)
        if TAIL_K > 0:
            v_tail = _produce(x_tail, tail_valid, tail_cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod,
                              mean, rstd, SMOOTH, PRODUCER, FAST, HW_TANH)
            absmax = tl.maximum(absmax, tl.max(tl.abs(v_tail), axis=1))
        scale = _row_scale(absmax)
        _store_codes(v, valid, rows, cols, scale, codes_ptr, stride_cm, FAST)
        if TAIL_K > 0:
            _store_codes(v_tail, tail_valid, rows, tail_cols, scale, codes_ptr, stride_cm, FAST)
    else:
        if PRODUCER == LAYERNORM_MODULATE:
            mean, rstd = _row_moments(x_ptr, y_ptr, gate_ptr, table_ptr, rows, row_ok, K, stride_xm, stride_ym,
                                      gate_row, table_rows_per_frame, table_frames, eps, RESIDUAL, TABLE, ROWS,
                                      BLOCK_K)
        peak = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            valid = row_ok[:, None] & (cols < K)[None, :]
            x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
            x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
            v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd, SMOOTH,
                         PRODUCER, FAST, HW_TANH)
            peak = tl.maximum(peak, tl.abs(v))
        scale = _row_scale(tl.max(peak, axis=1))
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            valid = row_ok[:, None] & (cols < K)[None, :]
            x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
            _store_residual(x, out_ptr, rows, cols, valid, stride_om, RESIDUAL)  # the last pass writes s, once
            x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
            v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd, SMOOTH,
                         PRODUCER, FAST, HW_TANH)
            _store_codes(v, valid, rows, cols, scale, codes_ptr, stride_cm, FAST)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def _tail_k(meta) -> int:
    return tail_width(meta["K"], meta["BLOCK_K"])


def _whole_row(meta) -> bool:
    return meta["K"] <= meta["BLOCK_K"] + meta["TAIL_K"]


# the integer kernel's tiles, and whole rows read as a power-of-two piece and a tail: K = 1152 as 1024 + 128,
# K = 4608 as 4096 + 512. One row per warp, (1, 1024, 1): the LayerNorm rows of an H100 step, 0.105 -> 0.095 ms with
# the residual step (docs/benchmarks.md, session 16)
FP8_AUTOTUNE_CONFIGS = AUTOTUNE_CONFIGS + ((4, 1024, 4), (8, 1024, 8), (1, 1024, 1), (1, 1024, 2), (4, 1024, 2),
                                           (1, 4096, 4), (2, 4096, 8))
configs = [triton.Config({"ROWS": r, "BLOCK_K": b}, num_warps=w) for r, b, w in FP8_AUTOTUNE_CONFIGS]
fp8_act_quant_tuned = triton.autotune(configs=configs, key=["K", "SMOOTH", "PRODUCER", "FAST", "RESIDUAL", "TABLE",
                                                                     "HW_TANH"],
                                      prune_configs_by={"early_config_prune": prune_configs})(
    triton.heuristics({"TAIL_K": _tail_k, "ONE_CHUNK": _whole_row})(fp8_act_quant_kernel))
