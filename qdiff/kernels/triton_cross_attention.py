"""Triton kernel of `qdiff.kernels.cross_attention` (imported lazily by its wrapper; see there for the contract).

Importing this module imports triton; `triton.jit` decides at import whether the kernel runs compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.

Grid (B, ⌈N/BLOCK_M⌉): program (b, i) takes the query rows [i·BLOCK_M, (i+1)·BLOCK_M) of sample b and loops over the
heads; per head it loads K and V of sample b (L ≤ 128 keys padded to a power of two; 0.55 MB per sample at XL/2 in
bf16, re-read from L2 by every program) and the rows' q, then writes the rows' output for that head. No online
softmax: all keys are in one tile. A head's channels are a power-of-two piece and a tail (72 = 64 + 8 in a 16-wide
piece, `cross_attention.head_pieces`), not one piece padded to 128. On an H100 at XL/2's shape this ran in
0.115 ms against 0.133 ms for a program per (query tile, head) with 128-wide heads and 0.143 ms for cuDNN's SDPA
(docs/benchmarks.md, session 15).
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode
from qdiff.kernels.triton_fp8_act_quant import _row_scale, _store_codes

INTERPRETED = interpret_mode()


@triton.jit
def _head_tile(base, rows, row_ok, lanes, lane_ok, stride_row):
    """Pointers and mask of one head's [rows, lanes] tile: base points at the head's first channel of row 0."""
    return base + rows[:, None].to(tl.int64) * stride_row + lanes[None, :], row_ok[:, None] & lane_ok[None, :]


@triton.jit
def cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, codes_ptr, scale_ptr, queries, qk_scale,
    stride_qb, stride_qn, stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_on,
    KEYS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr, FAST: tl.constexpr, CHUNK: tl.constexpr,
):
    """o[b, rows, :] = every head's softmax(q_h·k_hᵀ·scale, masked keys excluded)·v_h, for BLOCK_M query rows of one
    sample b; with QUANT also the per-token e4m3 codes and scales of those rows (o then serves as scratch).

    Program (b, i) takes rows [i·BLOCK_M, (i+1)·BLOCK_M) and loops over the heads: all of a row's channels come from
    one program, so its absmax over the heads is known when the loop ends. Each head's channels are read as a
    power-of-two piece D_MAIN and, when HEAD_DIM is not a power of two, a tail piece D_TAIL (72 = 64 + 8 in a
    16-wide piece) instead of one piece padded to 128. q [B, queries, C], k, v [B, KEYS, C], o like q (channel
    stride 1); mask_ptr [B, KEYS] uint8 when HAS_MASK; codes [B·queries, C] float8_e4m3fn and scale [B·queries]
    float32 (contiguous) when QUANT. Scores, softmax and accumulation in float32, the probabilities rounded to the
    input dtype before the product with v (as flash attention does). The e4m3 codes are those of
    `qdiff.kernels.fp8_quant.quantize_fp8_per_token` applied to o as stored (rounded to o's dtype): after the head
    loop a barrier, then the rows are read back from o (the program's own writes, in L2) in CHUNK-wide pieces, each
    loaded before the previous one's codes are stored.
    """
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < queries
    keys = tl.arange(0, BLOCK_L)
    key_ok = keys < KEYS
    attend = key_ok
    if HAS_MASK:
        attend = attend & (tl.load(mask_ptr + b * KEYS + keys, mask=key_ok, other=0) != 0)
    main = tl.arange(0, D_MAIN)
    main_ok = main < HEAD_DIM
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    v_base = v_ptr + b.to(tl.int64) * stride_vb
    o_base = o_ptr + b.to(tl.int64) * stride_ob
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(HEADS):
        col = h * HEAD_DIM
        ptrs, ok = _head_tile(q_base + col, rows, row_ok, main, main_ok, stride_qn)
        q = tl.load(ptrs, mask=ok, other=0.0)
        ptrs, ok = _head_tile(k_base + col, keys, key_ok, main, main_ok, stride_kl)
        k = tl.load(ptrs, mask=ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_L] f32
        if D_TAIL > 0:
            tail = D_MAIN + tl.arange(0, D_TAIL)
            tail_ok = tail < HEAD_DIM
            ptrs, ok = _head_tile(q_base + col, rows, row_ok, tail, tail_ok, stride_qn)
            q_tail = tl.load(ptrs, mask=ok, other=0.0)
            ptrs, ok = _head_tile(k_base + col, keys, key_ok, tail, tail_ok, stride_kl)
            k_tail = tl.load(ptrs, mask=ok, other=0.0)
            scores += tl.dot(q_tail, tl.trans(k_tail), input_precision=DOT_PRECISION)
        scores = tl.where(attend[None, :], scores * qk_scale, float("-inf"))  # log2 units; masked keys: no weight
        weights = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        ptrs, ok = _head_tile(v_base + col, keys, key_ok, main, main_ok, stride_vl)
        v = tl.load(ptrs, mask=ok, other=0.0)
        probs = (weights / tl.sum(weights, axis=1)[:, None]).to(v.dtype)
        out = tl.dot(probs, v, input_precision=DOT_PRECISION).to(o_ptr.dtype.element_ty)  # [BLOCK_M, D_MAIN]
        ptrs, ok = _head_tile(o_base + col, rows, row_ok, main, main_ok, stride_on)
        tl.store(ptrs, out, mask=ok)
        if QUANT:  # padded lanes hold 0 (v is 0 there)
            absmax = tl.maximum(absmax, tl.max(tl.abs(out.to(tl.float32)), axis=1))
        if D_TAIL > 0:
            tail = D_MAIN + tl.arange(0, D_TAIL)
            tail_ok = tail < HEAD_DIM
            ptrs, ok = _head_tile(v_base + col, keys, key_ok, tail, tail_ok, stride_vl)
            v_tail = tl.load(ptrs, mask=ok, other=0.0)
            out = tl.dot(probs, v_tail, input_precision=DOT_PRECISION).to(o_ptr.dtype.element_ty)
            ptrs, ok = _head_tile(o_base + col, rows, row_ok, tail, tail_ok, stride_on)
            tl.store(ptrs, out, mask=ok)
            if QUANT:
                absmax = tl.maximum(absmax, tl.max(tl.abs(out.to(tl.float32)), axis=1))
    if QUANT:
        tl.debug_barrier()  # the rows below were written by other threads of this program
        scale = _row_scale(absmax)
        token = b.to(tl.int64) * queries + rows  # row of the [B·queries, C] codes
        o_rows = o_base + rows[:, None].to(tl.int64) * stride_on
        cols = tl.arange(0, CHUNK)
        valid = row_ok[:, None] & (cols < HEADS * HEAD_DIM)[None, :]
        x = tl.load(o_rows + cols[None, :], mask=valid, other=0.0)
        for c0 in range(CHUNK, HEADS * HEAD_DIM + CHUNK, CHUNK):  # the next piece is loaded before this one is stored
            next_cols = c0 + tl.arange(0, CHUNK)
            next_valid = row_ok[:, None] & (next_cols < HEADS * HEAD_DIM)[None, :]
            x_next = tl.load(o_rows + next_cols[None, :], mask=next_valid, other=0.0)
            _store_codes(x.to(tl.float32), valid, token, cols, scale, codes_ptr, HEADS * HEAD_DIM, FAST)
            x, cols, valid = x_next, next_cols, next_valid
        tl.store(scale_ptr + token, scale, mask=row_ok)

# the kernel autotuned over (BLOCK_M, num_warps) (`cross_attention.CONFIGS`), once per shape and mode
AUTOTUNE_CONFIGS = ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
cross_attention_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in AUTOTUNE_CONFIGS],
    key=["queries", "KEYS", "HEADS", "HEAD_DIM", "HAS_MASK", "QUANT", "FAST"])(cross_attention_kernel)
