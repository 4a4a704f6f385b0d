"""Triton kernel of `qdiff.kernels.short_attention` (imported lazily by its wrapper; see there for the contract).

Importing this module imports triton; `triton.jit` decides at import whether the kernel runs compiled or under the
CPU interpreter (TRITON_INTERPRET=1), recorded in INTERPRETED.

q, k, v are frame-major [B, T, S, C] (the 3-D [B', N, C] case arrives as S = 1). One program solves PROBLEMS
(b, s, head) problems one after the other, problem p = ((b·S + s)·HEADS + head) of the flattened B·S·HEADS problems
(the last program masks the ones past the end): consecutive programs take consecutive heads, then consecutive
positions s, i.e. adjacent memory. A problem is small enough to live in registers: q, k, v tiles [BLOCK_N, BLOCK_D]
(T ≤ 32 frames padded to 16 or 32 rows, head_dim padded to a power of two: 72 -> 128 lanes, the pad masked), scores
[BLOCK_N, BLOCK_N] in float32. Register estimate for the temporal attention of STDiT-XL/2 (T = 16, d = 72 -> 16×128
tiles, bf16), per problem: q, k, v 3·2048·2 B = 12 KiB and the float32 output tile 8 KiB, i.e. ~40 32-bit registers
per thread at 4 warps (128 threads) before the dot operand copies: 4 warps leave room for many resident programs
(memory-bound: what counts is bytes in flight). `short_attention.CONFIGS` lists the (PROBLEMS, num_warps)
candidates that `bench/bench_short_attention.py --configs` sweeps; on an H100 one problem per program with one warp
was fastest (0.104 ms, 2.9 TB/s: `DEFAULT_CONFIG`).
"""
import triton
import triton.language as tl

from qdiff.kernels.act_quant import interpret_mode

INTERPRETED = interpret_mode()


@triton.jit
def _tile_ptrs(base, b, s, stride_b, stride_t, stride_s, seq, cols):
    """Pointers of one head's tile [BLOCK_N, BLOCK_D] at (b, s) of a [B, T, S, C] tensor (channel stride 1)."""
    return base + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + seq[:, None] * stride_t + cols[None, :]


@triton.jit
def short_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, problems, qk_scale,
    stride_qb, stride_qt, stride_qs, stride_kb, stride_kt, stride_ks, stride_vb, stride_vt, stride_vs,
    stride_ob, stride_ot, stride_os,
    SEQ: tl.constexpr, SPATIAL: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PROBLEMS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o[b, :, s, h·d:(h+1)·d] = softmax(q_h·k_hᵀ·scale)·v_h for PROBLEMS consecutive (b, s, h) problems.

    q, k, v [B, SEQ, SPATIAL, HEADS·HEAD_DIM] with channel stride 1 (batch, frame and position strides given); o
    likewise. qk_scale = log2(e)/√HEAD_DIM (the softmax runs on exp2). Scores, softmax and both accumulations are
    float32; in bf16/fp16 the probabilities are rounded to the input dtype before the product with v (as flash
    attention and `_math_attention` do). DOT_PRECISION: "ieee" for float32 inputs (exact float32 products), else
    the default.
    """
    seq = tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_D)
    seq_ok = seq < SEQ
    tile_ok = seq_ok[:, None] & (lanes < HEAD_DIM)[None, :]
    for i in tl.static_range(PROBLEMS):
        problem = tl.program_id(0) * PROBLEMS + i
        column = problem // HEADS  # b·S + s
        b, s = column // SPATIAL, column % SPATIAL
        cols = (problem % HEADS) * HEAD_DIM + lanes
        in_range = (seq * 0 + problem) < problems  # [BLOCK_N] bool (a tensor: the interpreter rejects scalar masks)
        valid = tile_ok & in_range[:, None]
        q = tl.load(_tile_ptrs(q_ptr, b, s, stride_qb, stride_qt, stride_qs, seq, cols), mask=valid, other=0.0)
        k = tl.load(_tile_ptrs(k_ptr, b, s, stride_kb, stride_kt, stride_ks, seq, cols), mask=valid, other=0.0)
        v = tl.load(_tile_ptrs(v_ptr, b, s, stride_vb, stride_vt, stride_vs, seq, cols), mask=valid, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_N] f32, log2
        scores = tl.where(seq_ok[None, :], scores, float("-inf"))  # padded keys get no weight
        weights = tl.exp2(scores - tl.max(scores, axis=1)[:, None])
        probs = weights / tl.sum(weights, axis=1)[:, None]
        out = tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D] f32
        tl.store(_tile_ptrs(o_ptr, b, s, stride_ob, stride_ot, stride_os, seq, cols),
                 out.to(o_ptr.dtype.element_ty), mask=valid)
