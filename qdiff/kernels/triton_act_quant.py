"""Triton kernel of `qdiff.kernels.act_quant` (imported lazily by its wrapper; see there for the math).

Importing this module imports triton; `triton.jit` decides at import whether kernels run compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode

INTERPRETED = interpret_mode()
# (ROWS, BLOCK_K, num_warps) candidates for the autotuner: chunked two-pass tiles, and whole-row tiles that read
# each row once (BLOCK_K ≥ K: 2048 covers K = 1152, 8192 covers K = 4608)
AUTOTUNE_CONFIGS = ((16, 256, 4), (32, 128, 4), (64, 128, 8), (4, 2048, 4), (8, 2048, 8), (2, 8192, 8), (1, 8192, 4))


@triton.jit
def _round_half_even(v):
    """torch.round of float32 v (ties to even) from floor only, so the CPU interpreter runs it too."""
    low = tl.floor(v)
    frac = v - low  # exact: low and v are within 1 of each other
    low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & low_is_odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _load_row_chunk(x_ptr, s_ptr, rows, cols, valid, K, stride_xm, SMOOTH: tl.constexpr):
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=valid, other=0.0)
    if SMOOTH:  # x / s in x's dtype, as the eager balancing does
        s = tl.load(s_ptr + cols, mask=cols < K, other=1.0)
        x = tl.math.div_rn(x.to(tl.float32), s[None, :].to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


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
def _quantize_chunk(x, valid, rows, cols, K, delta, zero, q_min, q_max, offset, codes_ptr, stride_cm, post_a_ptr,
                    rowsum, proj, R_OUT: tl.constexpr, R_PAD: tl.constexpr):
    """Store the codes of one [ROWS, BLOCK_K] chunk; add its code sums and TQE projection to rowsum, proj."""
    q = _round_half_even(tl.math.div_rn(x, delta[:, None])) + zero[:, None]
    q = tl.minimum(tl.maximum(q, q_min), q_max)
    code = tl.where(valid, (q - offset).to(tl.int32), 0)
    tl.store(codes_ptr + rows[:, None] * stride_cm + cols[None, :], code.to(tl.int8), mask=valid)
    rowsum += tl.sum(code, axis=1)
    if R_OUT > 0:
        dequant = tl.where(valid, (q - zero[:, None]) * delta[:, None], 0.0)  # x̂ [ROWS, BLOCK_K]
        ranks = tl.arange(0, R_PAD)
        a = tl.load(post_a_ptr + ranks[:, None] * K + cols[None, :],
                    mask=(ranks < R_OUT)[:, None] & (cols < K)[None, :], other=0.0)  # [R_PAD, BLOCK_K]
        proj += tl.sum(dequant[:, None, :] * a[None, :, :], axis=2)
    return rowsum, proj


@triton.jit
def act_quant_kernel(
    x_ptr, s_ptr, codes_ptr, scale_ptr, zero_ptr, rowsum_ptr, post_a_ptr, proj_ptr, frame_ptr,
    M, K, stride_xm, stride_cm, n_frames, static_delta, static_zero, q_min, q_max, offset, min_delta,
    SMOOTH: tl.constexpr, STATIC: tl.constexpr, SYMMETRIC: tl.constexpr, R_OUT: tl.constexpr,
    R_PAD: tl.constexpr, FRAMES: tl.constexpr, ONE_CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ONE_CHUNK (K ≤ BLOCK_K): the row is read once. Else two passes over K: the range, then the codes."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < M
    rowsum = tl.zeros([ROWS], dtype=tl.int32)
    proj = tl.zeros([ROWS, R_PAD], dtype=tl.float32)
    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        x = _load_row_chunk(x_ptr, s_ptr, rows, cols, valid, K, stride_xm, SMOOTH)  # padding reads 0
        if STATIC:
            delta = tl.zeros([ROWS], dtype=tl.float32) + static_delta
            zero = tl.zeros([ROWS], dtype=tl.float32) + static_zero
        else:  # the clamps min(·, 0) / max(·, 0) come with the zero padding or explicitly
            delta, zero = _row_grid(tl.minimum(tl.min(x, axis=1), 0.0), tl.maximum(tl.max(x, axis=1), 0.0),
                                    q_max, min_delta, SYMMETRIC)
        rowsum, proj = _quantize_chunk(x, valid, rows, cols, K, delta, zero, q_min, q_max, offset, codes_ptr,
                                       stride_cm, post_a_ptr, rowsum, proj, R_OUT, R_PAD)
    else:
        if STATIC:
            delta = tl.zeros([ROWS], dtype=tl.float32) + static_delta
            zero = tl.zeros([ROWS], dtype=tl.float32) + static_zero
        else:
            lo = tl.zeros([ROWS], dtype=tl.float32)
            hi = tl.zeros([ROWS], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                valid = row_ok[:, None] & (cols < K)[None, :]
                x = _load_row_chunk(x_ptr, s_ptr, rows, cols, valid, K, stride_xm, SMOOTH)
                lo = tl.minimum(lo, tl.min(x, axis=1))
                hi = tl.maximum(hi, tl.max(x, axis=1))
            delta, zero = _row_grid(lo, hi, q_max, min_delta, SYMMETRIC)
        for k0 in range(0, K, BLOCK_K):  # second pass: the chunks come back from L2
            cols = k0 + tl.arange(0, BLOCK_K)
            valid = row_ok[:, None] & (cols < K)[None, :]
            x = _load_row_chunk(x_ptr, s_ptr, rows, cols, valid, K, stride_xm, SMOOTH)
            rowsum, proj = _quantize_chunk(x, valid, rows, cols, K, delta, zero, q_min, q_max, offset, codes_ptr,
                                           stride_cm, post_a_ptr, rowsum, proj, R_OUT, R_PAD)
    tl.store(scale_ptr + rows, delta, mask=row_ok)
    tl.store(zero_ptr + rows, (zero - offset).to(tl.int32), mask=row_ok)
    tl.store(rowsum_ptr + rows, rowsum, mask=row_ok)
    if R_OUT > 0:
        if FRAMES:
            factor = tl.load(frame_ptr + rows % n_frames, mask=row_ok, other=0.0)
            proj = proj * factor[:, None]
        ranks = tl.arange(0, R_PAD)
        tl.store(proj_ptr + rows[:, None] * R_OUT + ranks[None, :], proj,
                 mask=row_ok[:, None] & (ranks < R_OUT)[None, :])


def one_chunk(meta) -> bool:
    """The whole row fits one BLOCK_K chunk: read it once."""
    return meta["K"] <= meta["BLOCK_K"]


def prune_configs(configs, named_args, **kwargs):
    """Drop chunks wider than the row needs (K rounded up to a power of two)."""
    width = triton.next_power_of_2(named_args["K"])
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(width, 128)]
    return kept or configs[:1]


configs = [triton.Config({"ROWS": r, "BLOCK_K": b}, num_warps=w) for r, b, w in AUTOTUNE_CONFIGS]
act_quant_tuned = triton.autotune(configs=configs, key=["K", "SMOOTH", "STATIC", "R_OUT"],
                                  prune_configs_by={"early_config_prune": prune_configs})(
    triton.heuristics({"ONE_CHUNK": one_chunk})(act_quant_kernel))


@triton.jit
def codes_projection_kernel(
    codes_ptr, scale_ptr, zero_ptr, post_a_ptr, proj_ptr, frame_ptr, M, K, stride_cm, n_frames,
    R_OUT: tl.constexpr, R_PAD: tl.constexpr, FRAMES: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """proj[m, j] = f_m · Σ_k (c[m, k] − z_c[m])·Δ[m]·A_out[j, k] from existing int8 codes."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    delta = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    zero = tl.load(zero_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    ranks = tl.arange(0, R_PAD)
    proj = tl.zeros([ROWS, R_PAD], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        valid = row_ok[:, None] & (cols < K)[None, :]
        code = tl.load(codes_ptr + rows[:, None] * stride_cm + cols[None, :], mask=valid, other=0).to(tl.float32)
        dequant = tl.where(valid, (code - zero[:, None]) * delta[:, None], 0.0)
        a = tl.load(post_a_ptr + ranks[:, None] * K + cols[None, :],
                    mask=(ranks < R_OUT)[:, None] & (cols < K)[None, :], other=0.0)
        proj += tl.sum(dequant[:, None, :] * a[None, :, :], axis=2)
    if FRAMES:
        factor = tl.load(frame_ptr + rows % n_frames, mask=row_ok, other=0.0)
        proj = proj * factor[:, None]
    tl.store(proj_ptr + rows[:, None] * R_OUT + ranks[None, :], proj, mask=row_ok[:, None] & (ranks < R_OUT)[None, :])


codes_projection_tuned = triton.autotune(configs=configs, key=["K", "R_OUT"],
                                        prune_configs_by={"early_config_prune": prune_configs})(codes_projection_kernel)
