"""Triton kernels of `qdiff.kernels.int_gemm` (imported lazily by its wrapper; see there for the math).

Importing this module imports triton; `triton.jit` decides at import whether kernels run compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode

INTERPRETED = interpret_mode()
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); BLOCK_K counts bytes of W (int4: 2·BLOCK_K channels).
# The last four are for Hopper's wgmma at XL/2's shapes (M = 32768; K = 1152 or 4608): deeper pipelines of
# 128-byte K steps for W8, and 64-byte steps for W4 (EVEN_K at K = 1152, where ⌈K/2⌉ = 576 = 9·64). Tiles that
# need more shared memory than the GPU has are skipped by the autotuner.
AUTOTUNE_CONFIGS = (
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 128, 64, 5, 4),
    (64, 128, 128, 4, 4),
    (128, 256, 128, 4, 8),
    (128, 128, 128, 4, 4),
    (128, 256, 64, 4, 8),
    (256, 128, 64, 4, 8),
)

def even_k(meta) -> bool:
    """Every K-tile is full (no K masks): KW is a multiple of BLOCK_K and, for int4, K is even."""
    return meta["KW"] % meta["BLOCK_K"] == 0 and (not meta["W4"] or meta["K"] % 2 == 0)

def prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (small M such as the packed text tokens)."""
    rows = named_args["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, 2 * rows)]
    return kept or configs[-1:]

@triton.jit
def int_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, a_zero_ptr, a_rowsum_ptr, w_scale_ptr, w_zero_ptr, w_colsum_ptr,
    bias_ptr, proj_ptr, post_b_ptr,
    M, N, K, KW, stride_am, stride_wn, stride_om, M_BUCKET,
    A_ZERO: tl.constexpr, W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, R_OUT: tl.constexpr,
    W4: tl.constexpr, OUT_INT32: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row tiles share each weight column tile while it sits in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = rows % M  # wrapped indices: every load is in bounds; the store is masked
    cols_in = cols % N
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows_in.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + cols_in.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if W4:
        # byte column j of W holds channels j (low nibble) and j + KW (high nibble), KW = ceil(K/2)
        for k0 in range(0, KW, BLOCK_K):
            kk = k0 + ks
            if EVEN_K:
                packed = tl.load(w_rows + kk[None, :])
                a_low = tl.load(a_rows + kk[None, :])
                a_high = tl.load(a_rows + (kk + KW)[None, :])
            else:
                packed = tl.load(w_rows + kk[None, :], mask=(kk < KW)[None, :], other=0)
                a_low = tl.load(a_rows + kk[None, :], mask=(kk < KW)[None, :], other=0)
                a_high = tl.load(a_rows + (kk + KW)[None, :], mask=(kk + KW < K)[None, :], other=0)
            w_low = ((packed << 4).to(tl.int8) >> 4).to(tl.int8)  # sign-extended low nibble
            w_high = (packed >> 4).to(tl.int8)  # arithmetic shift: sign-extended high nibble
            acc = tl.dot(a_low, tl.trans(w_low), acc, out_dtype=tl.int32)
            acc = tl.dot(a_high, tl.trans(w_high), acc, out_dtype=tl.int32)
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            if EVEN_K:
                a = tl.load(a_rows + kk[None, :])
                w = tl.load(w_rows + kk[None, :])
            else:
                a = tl.load(a_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
                w = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)

    # epilogue: zero-point corrections in int32, then scales, bias and the TQE post term in float32
    if A_ZERO:
        a_zero = tl.load(a_zero_ptr + rows_in)
        acc -= a_zero[:, None] * tl.load(w_colsum_ptr + cols_in)[None, :]
    if W_ZERO:
        w_zero = tl.load(w_zero_ptr + cols_in)
        acc -= tl.load(a_rowsum_ptr + rows_in)[:, None] * w_zero[None, :]
        if A_ZERO:
            acc += (K * a_zero)[:, None] * w_zero[None, :]
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + rows_in)[:, None]
        y = y * tl.load(w_scale_ptr + cols_in)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols_in)[None, :]
        for j in tl.static_range(R_OUT):
            y += tl.load(proj_ptr + rows_in * R_OUT + j)[:, None] * tl.load(post_b_ptr + cols_in * R_OUT + j)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)

configs = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
    for bm, bn, bk, stages, warps in AUTOTUNE_CONFIGS
]
int_gemm_tuned = triton.autotune(
    configs=configs, key=["M_BUCKET", "N", "K", "W4", "A_ZERO", "W_ZERO", "R_OUT", "OUT_INT32"],
    prune_configs_by={"early_config_prune": prune_configs},
)(triton.heuristics({"EVEN_K": even_k})(int_gemm_kernel))
