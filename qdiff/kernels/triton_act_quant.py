"""Triton kernels of `qdiff.kernels.act_quant` (imported lazily by its wrapper; see there for the math).

Importing this module imports triton; `triton.jit` decides at import whether kernels run compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.

Built to compile on every Triton GPU backend: tensors are at most 2-D, every reduction is along axis 1, and no
reduction sits inside a loop. Loops over K chunks carry element-wise [ROWS, BLOCK_K] accumulators (LayerNorm sums,
range, code sums, the TQE projection) and reduce them once after the loop: Triton 3.6's
`TritonGPUOptimizeThreadLocality` pass, which rewrites reductions inside loops, fails on some of them on sm_90.
The in-kernel TQE projection supports r_out ≤ 1 (the papers' rank); the wrapper computes higher ranks from the
codes with torch. Globals read by kernels are `tl.constexpr` (Triton 3.6 refuses plain globals when compiling).
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode
from qdiff.kernels import fused_producers

INTERPRETED = interpret_mode()
# (ROWS, BLOCK_K, num_warps) candidates for the autotuner: chunked multi-pass tiles, and whole-row tiles that read
# each row once (BLOCK_K ≥ K: 2048 covers K = 1152, 8192 covers K = 4608)
AUTOTUNE_CONFIGS = ((16, 256, 4), (32, 128, 4), (64, 128, 8), (4, 2048, 4), (8, 2048, 8), (2, 8192, 8), (1, 8192, 4))
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
LAYERNORM_MODULATE = tl.constexpr(fused_producers.LAYERNORM_MODULATE)
GELU_TANH = tl.constexpr(fused_producers.GELU_TANH)
NO_RESIDUAL = tl.constexpr(fused_producers.NO_RESIDUAL)
RESIDUAL_GATED_ADD = tl.constexpr(fused_producers.RESIDUAL_GATED_ADD)


@triton.jit
def _round_half_even(v):
    """torch.round of float32 v (ties to even) from floor only, so the CPU interpreter runs it too."""
    low = tl.floor(v)
    frac = v - low  # exact: low and v are within 1 of each other
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _div(a, b, FAST: tl.constexpr):
    """a / b in float32: IEEE round-to-nearest (as torch divides), or FAST: the GPU's approximate division (≤ 2 ulp)."""
    if FAST:
        return a / b
    return tl.math.div_rn(a, b)


@triton.jit
def _gelu_tanh(v, FAST: tl.constexpr, HW_TANH: tl.constexpr):
    """0.5·v·(1 + tanh(u)), u = √(2/π)·(v + 0.044715·v³), in float32: as v / (1 + exp(−2u)) (accurate for v < 0
    too, where 1 + tanh(u) cancels), or HW_TANH with the GPU's `tanh.approx.f32` (one MUFU operation instead of the
    exponential and the division; error ~2^-11 of tanh, which the cancellation leaves on values far below the row's
    absmax: a code moves by one step on ~0.2% of the elements)."""
    u = SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)
    if HW_TANH:
        tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True,
                                         pack=1)
        return 0.5 * v * (1.0 + tanh)
    return _div(v, 1.0 + tl.exp(-2.0 * u), FAST)


@triton.jit
def _load(x_ptr, rows, cols, valid, stride_xm):
    """One [ROWS, BLOCK_K] chunk of x in its own dtype (0 outside `valid`)."""
    return tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=valid, other=0.0)


@triton.jit
def _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL: tl.constexpr):
    """One [ROWS, BLOCK_K] chunk of the producer's input in x's dtype (0 outside `valid`): x, or with a residual step
    s = x + gate·y (RESIDUAL 2; 1: x + y), each op rounded to x's dtype as the eager ops are (launched without fma
    contraction). gate_row [ROWS]: the offset of each row's gate row (sample · gate stride)."""
    x = _load(x_ptr, rows, cols, valid, stride_xm)
    if RESIDUAL != NO_RESIDUAL:
        y = _load(y_ptr, rows, cols, valid, stride_ym)
        if RESIDUAL == RESIDUAL_GATED_ADD:
            gate = tl.load(gate_ptr + gate_row[:, None] + cols[None, :], mask=valid, other=0.0)
            y = (gate.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _store_residual(s, out_ptr, rows, cols, valid, stride_om, RESIDUAL: tl.constexpr):
    """Write a chunk of the residual step's s (x's dtype) to the new residual stream (nothing without one)."""
    if RESIDUAL != NO_RESIDUAL:
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], s, mask=valid)


@triton.jit
def _add_table(s, table_ptr, rows, cols, valid, K, rows_per_frame, n_frames, TABLE: tl.constexpr):
    """The producer's input of a chunk s (x's dtype; 0 outside `valid`): s + table[frame] rounded to s's dtype, as
    the eager add, with row m in frame (m // rows_per_frame) % n_frames of the table [n_frames, K] (contiguous);
    s itself without a table (TABLE False)."""
    if TABLE:
        frame = (rows // rows_per_frame) % n_frames
        table = tl.load(table_ptr + frame[:, None] * K + cols[None, :], mask=valid, other=0.0)
        s = (s.to(tl.float32) + table.to(tl.float32)).to(s.dtype)
    return s


@triton.jit
def _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd,
             SMOOTH: tl.constexpr, PRODUCER: tl.constexpr, FAST: tl.constexpr, HW_TANH: tl.constexpr):
    """The quantizer's input for a chunk x (x's dtype) as float32, 0 outside `valid`. Each eager op's result is
    rounded to x's dtype, as the eager model rounds it: producer (LayerNorm + modulate, or GELU), then x / s."""
    if PRODUCER == LAYERNORM_MODULATE:
        y = ((x.to(tl.float32) - mean[:, None]) * rstd[:, None]).to(x.dtype)
        mod = sample[:, None] * stride_mod + cols[None, :]
        one_plus = (1.0 + tl.load(mscale_ptr + mod, mask=valid, other=0.0).to(tl.float32)).to(x.dtype)
        y = (y.to(tl.float32) * one_plus.to(tl.float32)).to(x.dtype)
        x = (y.to(tl.float32) + tl.load(shift_ptr + mod, mask=valid, other=0.0).to(tl.float32)).to(x.dtype)
    if PRODUCER == GELU_TANH:
        x = _gelu_tanh(x.to(tl.float32), FAST, HW_TANH).to(x.dtype)
    if SMOOTH:  # x / s in x's dtype, as the eager balancing does
        s = tl.load(s_ptr + cols, mask=cols < K, other=1.0)
        x = _div(x.to(tl.float32), s[None, :].to(tl.float32), FAST).to(x.dtype)
    return tl.where(valid, x.to(tl.float32), 0.0)


@triton.jit
def _chunk_moments(x, valid, K, eps):
    """LayerNorm (mean, rstd) [ROWS] of rows held whole in one chunk x (x's dtype; 0 outside `valid`)."""
    width = K * 1.0
    x32 = x.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x32, axis=1), width)
    dev = tl.where(valid, x32 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.math.div_rn(tl.sum(dev * dev, axis=1), width) + eps)
    return mean, rstd


@triton.jit
def _row_moments(x_ptr, y_ptr, gate_ptr, table_ptr, rows, row_ok, K, stride_xm, stride_ym, gate_row, rows_per_frame,
                 n_frames, eps, RESIDUAL: tl.constexpr, TABLE: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """LayerNorm (mean, rstd) [ROWS] of the rows of the producer's input (x, or the residual step's s, plus the
    table with TABLE, recomputed here: `_load_input`, `_add_table`) read in BLOCK_K chunks, twice: the mean, then
    the squared deviations from it."""
    width = K * 1.0
    total = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        u = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
        total += _add_table(u, table_ptr, rows, cols, valid, K, rows_per_frame, n_frames, TABLE).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(total, axis=1), width)
    total = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        s = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
        s = _add_table(s, table_ptr, rows, cols, valid, K, rows_per_frame, n_frames, TABLE)
        dev = tl.where(valid, s.to(tl.float32) - mean[:, None], 0.0)
        total += dev * dev
    rstd = 1.0 / tl.sqrt_rn(tl.math.div_rn(tl.sum(total, axis=1), width) + eps)
    return mean, rstd


@triton.jit
def _row_grid(lo, hi, q_max, min_delta, SYMMETRIC: tl.constexpr):
    """(Δ, z) [ROWS] of rows with min lo (≤ 0) and max hi (≥ 0)."""
    if SYMMETRIC:
        delta = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi), q_max), min_delta)
        zero = tl.zeros(lo.shape, dtype=tl.float32)
    else:
        delta = tl.maximum(tl.math.div_rn(hi - lo, q_max), min_delta)
        zero = _round_half_even(tl.math.div_rn(-lo, delta))
    return delta, zero


@triton.jit
def _quantize_chunk(v, valid, rows, cols, K, delta, zero, q_min, q_max, offset, codes_ptr, stride_cm, post_a_ptr,
                    code_acc, proj_acc, R_OUT: tl.constexpr, FAST: tl.constexpr):
    """Store the codes of one [ROWS, BLOCK_K] chunk v (float32); add them, and (R_OUT = 1) x̂·a_out, element-wise to
    the [ROWS, BLOCK_K] accumulators (the caller reduces them along axis 1 once, after its loop)."""
    if FAST:  # one reciprocal per row instead of a division per element; a code may move by one on a tie
        q = _round_half_even(v * (1.0 / delta)[:, None]) + zero[:, None]
    else:
        q = _round_half_even(tl.math.div_rn(v, delta[:, None])) + zero[:, None]
    q = tl.minimum(tl.maximum(q, q_min), q_max)
    code = tl.where(valid, (q - offset).to(tl.int32), 0)
    tl.store(codes_ptr + rows[:, None] * stride_cm + cols[None, :], code.to(tl.int8), mask=valid)
    code_acc += code
    if R_OUT > 0:
        dequant = tl.where(valid, (q - zero[:, None]) * delta[:, None], 0.0)  # x̂ [ROWS, BLOCK_K]
        a = tl.load(post_a_ptr + cols, mask=cols < K, other=0.0)  # [BLOCK_K]
        proj_acc += dequant * a[None, :]
    return code_acc, proj_acc


@triton.jit
def act_quant_kernel(
    x_ptr, s_ptr, shift_ptr, mscale_ptr, codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, post_a_ptr, proj_ptr, frame_ptr,
    y_ptr, gate_ptr, out_ptr, table_ptr,
    M, K, stride_xm, stride_cm, rows_per_sample, stride_mod, n_frames, static_delta, static_zero, q_min, q_max, offset,
    min_delta, eps, stride_ym, stride_om, gate_rows_per_sample, stride_gate, table_rows_per_frame, table_frames,
    SMOOTH: tl.constexpr, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, R_OUT: tl.constexpr,
    FRAMES: tl.constexpr, PRODUCER: tl.constexpr, ONE_CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    FAST: tl.constexpr, RESIDUAL: tl.constexpr, TABLE: tl.constexpr, HW_TANH: tl.constexpr,
):
    """ONE_CHUNK (K ≤ BLOCK_K): the row is read once. Else passes over K in chunks (the re-reads hit L2): the
    LayerNorm moments (producer 1: mean, then the squared deviations), the range (dynamic grids), then the codes.
    R_OUT ∈ {0, 1}: proj [M] = f_m · x̂_m · a_out (post_a_ptr: a_out [K]). RESIDUAL (1: x + y, 2: x + gate·y):
    every pass recomputes s from x, y (and the gate) instead of reading x; the codes pass writes s to out_ptr.
    TABLE: the producer reads s + table[frame] (`_add_table`, after s is written) in every pass."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < M
    sample = rows // rows_per_sample
    gate_row = (rows // gate_rows_per_sample) * stride_gate
    code_acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
    proj_acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    mean = tl.zeros([ROWS], dtype=tl.float32)
    rstd = tl.zeros([ROWS], dtype=tl.float32)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
        _store_residual(x, out_ptr, rows, cols, valid, stride_om, RESIDUAL)
        x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
        if PRODUCER == LAYERNORM_MODULATE:
            mean, rstd = _chunk_moments(x, valid, K, eps)
        v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd, SMOOTH,
                     PRODUCER, FAST, HW_TANH)
        if STATIC:
            delta = tl.zeros([ROWS], dtype=tl.float32) + static_delta
            zero = tl.zeros([ROWS], dtype=tl.float32) + static_zero
        else:  # the clamps min(·, 0) / max(·, 0) come with the zero padding or explicitly
            delta, zero = _row_grid(tl.minimum(tl.min(v, axis=1), 0.0), tl.maximum(tl.max(v, axis=1), 0.0),
                                    q_max, min_delta, SYMMETRIC)
        code_acc, proj_acc = _quantize_chunk(v, valid, rows, cols, K, delta, zero, q_min, q_max, offset, codes_ptr,
                                             stride_cm, post_a_ptr, code_acc, proj_acc, R_OUT, FAST)
    else:
        if PRODUCER == LAYERNORM_MODULATE:
            mean, rstd = _row_moments(x_ptr, y_ptr, gate_ptr, table_ptr, rows, row_ok, K, stride_xm, stride_ym,
                                      gate_row, table_rows_per_frame, table_frames, eps, RESIDUAL, TABLE, ROWS,
                                      BLOCK_K)
        if STATIC:
            delta = tl.zeros([ROWS], dtype=tl.float32) + static_delta
            zero = tl.zeros([ROWS], dtype=tl.float32) + static_zero
        else:
            lo = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)  # starting at 0: the clamps min(·, 0), max(·, 0)
            hi = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                valid = row_ok[:, None] & (cols < K)[None, :]
                x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row,
                                RESIDUAL)
                x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
                v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd,
                             SMOOTH, PRODUCER, FAST, HW_TANH)
                lo = tl.minimum(lo, v)
                hi = tl.maximum(hi, v)
            delta, zero = _row_grid(tl.min(lo, axis=1), tl.max(hi, axis=1), q_max, min_delta, SYMMETRIC)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            valid = row_ok[:, None] & (cols < K)[None, :]
            x = _load_input(x_ptr, y_ptr, gate_ptr, rows, cols, valid, stride_xm, stride_ym, gate_row, RESIDUAL)
            _store_residual(x, out_ptr, rows, cols, valid, stride_om, RESIDUAL)  # the last pass writes s, once
            x = _add_table(x, table_ptr, rows, cols, valid, K, table_rows_per_frame, table_frames, TABLE)
            v = _produce(x, valid, cols, K, s_ptr, shift_ptr, mscale_ptr, sample, stride_mod, mean, rstd,
                         SMOOTH, PRODUCER, FAST, HW_TANH)
            code_acc, proj_acc = _quantize_chunk(v, valid, rows, cols, K, delta, zero, q_min, q_max, offset,
                                                 codes_ptr, stride_cm, post_a_ptr, code_acc, proj_acc, R_OUT, FAST)
    tl.store(scale_ptr + rows, delta, mask=row_ok)
    tl.store(zero_ptr + rows, (zero - offset).to(tl.int32), mask=row_ok)
    tl.store(rowsum_ptr + rows, tl.sum(code_acc, axis=1), mask=row_ok)
    if R_OUT > 0:
        proj = tl.sum(proj_acc, axis=1)  # [ROWS]
        if FRAMES:
            proj = proj * tl.load(frame_ptr + rows % n_frames, mask=row_ok, other=0.0)
        tl.store(proj_ptr + rows, proj, mask=row_ok)


def one_chunk(meta) -> bool:
    """The whole row fits one BLOCK_K chunk: read it once."""
    return meta["K"] <= meta["BLOCK_K"]


def tail_width(width: int, block_k: int) -> int:
    """Lanes of the tail piece that completes a row of `width` = K elements read as BLOCK_K + tail, when K exceeds
    BLOCK_K by at most a quarter of it (0: no tail). K = 1152 then reads as 1024 + 128 lanes and K = 4608 as
    4096 + 512, where one power-of-two chunk would pad the row to 2048 or 8192 lanes (and compute on the padding)."""
    rest = width - block_k
    if rest <= 0:
        return 0
    tail = max(16, triton.next_power_of_2(rest))
    return tail if tail <= block_k // 4 else 0


def prune_configs(configs, named_args, **kwargs):
    """Drop chunks wider than the row needs (K rounded up to a power of two)."""
    width = triton.next_power_of_2(named_args["K"])
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(width, 128)]
    return kept or configs[:1]


configs = [triton.Config({"ROWS": r, "BLOCK_K": b}, num_warps=w) for r, b, w in AUTOTUNE_CONFIGS]
act_quant_tuned = triton.autotune(configs=configs,
                                  key=["K", "SMOOTH", "STATIC", "R_OUT", "PRODUCER", "FAST", "RESIDUAL", "TABLE",
                                       "HW_TANH"],
                                  prune_configs_by={"early_config_prune": prune_configs})(
    triton.heuristics({"ONE_CHUNK": one_chunk})(act_quant_kernel))


@triton.jit
def codes_projection_kernel(
    codes_ptr, scale_ptr, zero_ptr, post_a_ptr, proj_ptr, frame_ptr, M, K, stride_cm, n_frames,
    FRAMES: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """proj[m] = f_m · Σ_k (c[m, k] − z_c[m])·Δ[m]·a_out[k] from existing int8 codes (rank 1)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    delta = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    zero = tl.load(zero_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    proj_acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        code = tl.load(codes_ptr + rows[:, None] * stride_cm + cols[None, :], mask=valid, other=0).to(tl.float32)
        a = tl.load(post_a_ptr + cols, mask=cols < K, other=0.0)
        proj_acc += tl.where(valid, (code - zero[:, None]) * delta[:, None], 0.0) * a[None, :]
    proj = tl.sum(proj_acc, axis=1)
    if FRAMES:
        proj = proj * tl.load(frame_ptr + rows % n_frames, mask=row_ok, other=0.0)
    tl.store(proj_ptr + rows, proj, mask=row_ok)


codes_projection_tuned = triton.autotune(configs=configs, key=["K", "FRAMES"],
                                        prune_configs_by={"early_config_prune": prune_configs})(codes_projection_kernel)
