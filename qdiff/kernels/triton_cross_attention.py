"""Triton kernel of `qdiff.kernels.cross_attention` (imported lazily by its wrapper; see there for the contract).

Importing this module imports triton; `triton.jit` decides at import whether the kernel runs compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.

Grid (B·HEADS, ⌈N/BLOCK_M⌉): program (b·HEADS + h, i) loads head h's K and V of sample b once, as tiles [BLOCK_L,
BLOCK_D] (L ≤ 128 keys padded to a power of two, head_dim likewise: XL/2's 120 x 72 -> 128 x 128, the pad zero),
then the query rows [i·BLOCK_M, (i+1)·BLOCK_M) of that head. Consecutive programs take consecutive heads of the same
query rows, i.e. adjacent memory of q and out; K and V (0.55 MB per sample at XL/2 in bf16) are re-read from L2 by
every program, so a larger BLOCK_M reads them fewer times. No online softmax: all keys are in one tile.
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode

INTERPRETED = interpret_mode()


@triton.jit
def cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, queries, qk_scale,
    stride_qb, stride_qn, stride_kb, stride_kl, stride_vb, stride_vl, stride_ob, stride_on,
    KEYS: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o[b, rows, h·d:(h+1)·d] = softmax(q_h·k_hᵀ·scale, masked keys excluded)·v_h for one (b, h), BLOCK_M rows.

    q [B, queries, HEADS·HEAD_DIM], k, v [B, KEYS, HEADS·HEAD_DIM], o like q, all with channel stride 1; mask_ptr
    [B, KEYS] uint8 (nonzero = attend, contiguous) when HAS_MASK. qk_scale = log2(e)/√HEAD_DIM (the softmax runs on
    exp2). Scores, softmax and the accumulation are float32; in bf16/fp16 the probabilities are rounded to the input
    dtype before the product with v (as flash attention does). DOT_PRECISION: "ieee" for float32 inputs (exact
    float32 products), else the default. A row with no valid key gives NaN (the caller guarantees one).
    """
    b = tl.program_id(0) // HEADS
    cols = (tl.program_id(0) % HEADS) * HEAD_DIM + tl.arange(0, BLOCK_D)
    lane_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    keys = tl.arange(0, BLOCK_L)
    key_ok = keys < KEYS
    kv_ok = key_ok[:, None] & lane_ok[None, :]
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + keys[:, None] * stride_kl + cols[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + keys[:, None] * stride_vl + cols[None, :], mask=kv_ok, other=0.0)
    attend = key_ok
    if HAS_MASK:
        attend = attend & (tl.load(mask_ptr + b * KEYS + keys, mask=key_ok, other=0) != 0)

    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_ok = (rows < queries)[:, None] & lane_ok[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + rows[:, None].to(tl.int64) * stride_qn + cols[None, :],
                mask=tile_ok, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_L] f32, log2 units
    scores = tl.where(attend[None, :], scores, float("-inf"))  # masked and padded keys get no weight
    weights = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
    probs = weights / tl.sum(weights, axis=1)[:, None]
    out = tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_D] f32
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_on + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=tile_ok)
