"""The inference kernels as `torch.library` custom ops, so that torch.compile sees each one as a single opaque call.

Dynamo does not trace into a Triton launcher (autotuners, heuristics, host-side checks) and does not graph-break
on one: under compilation the dispatch functions (`qdiff.kernels.int_gemm.int_gemm`,
`qdiff.kernels.act_quant.quantize_per_token` / `project_codes`, `qdiff.kernels.fp8_quant.quantize_fp8_per_token`
with backend "auto" or "triton", `qdiff.kernels.fake_quant.fake_quant_per_token`,
`qdiff.kernels.weight_quant.fake_quant_weight`) call the ops below instead of the kernels. Each op's
implementation is that same dispatch function run eagerly, so it picks the Triton kernel on CUDA and the PyTorch
reference elsewhere (CPU: torch integer matmul) exactly as the eager model does; each op has a `register_fake`
shape function for tracing. Eager (uncompiled) calls never go through these ops: they keep the direct path.

    torch.ops.qdiff.int_gemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, proj, post_b,
                             out_dtype, k, backend) -> y [M, N]
    torch.ops.qdiff.quantize_per_token(x, bits, symmetric, smooth_scale, static_delta, static_zero, post_a,
                                       frame_factor, producer, shift, mscale, rows_per_sample, eps, backend, fast)
        -> (codes [M, K] int8, scale [M] f32, zero [M] i32, rowsum [M] i32, proj [M, r] f32; r = 0 without post_a)
    torch.ops.qdiff.quantize_fp8_per_token(x, smooth_scale, producer, shift, mscale, rows_per_sample, eps, backend,
                                           fast) -> (codes [M, K] float8_e4m3fn, scale [M, 1] f32)
    torch.ops.qdiff.quantize_per_token_residual(x, y, gate, gate_rows_per_sample, table, rows_per_frame,
                                                <quantize_per_token's arguments after x>)
        -> (<quantize_per_token's outputs>, s [M, K] like x)
    torch.ops.qdiff.quantize_fp8_per_token_residual(x, y, gate, gate_rows_per_sample, table, rows_per_frame,
                                                    <quantize_fp8_per_token's arguments after x>)
        -> (codes, scale, s [M, K] like x)
        (the residual step s = x + gate·y in front of the producer, which reads s + table[frame] with a table [T, K],
        `qdiff.kernels.fused_producers.Residual`)
    torch.ops.qdiff.project_codes(codes, scale, zero, post_a, frame_factor, backend) -> proj [M, r] f32
    torch.ops.qdiff.fake_quant_per_token(x, bits) -> x̂ like x
    torch.ops.qdiff.fake_quant_weight(weight, delta, zero_point, bits, symmetric, smooth, low_rank, post, post_b,
                                      post_a, out_dtype) -> Ŵ [d_out, d_in]
    torch.ops.qdiff.short_attention(q, k, v, num_heads, backend) -> out like q, contiguous
        (`qdiff.kernels.short_attention.short_attention`: q, k, v [B, T, S, C] or [B', N, C] -> per-head
        softmax(q·kᵀ/√d)·v over dim 1)
    torch.ops.qdiff.cross_attention(q, k, v, key_mask, num_heads, backend) -> out like q, contiguous
        (`qdiff.kernels.cross_attention.cross_attention`: q [B, N, C], k, v [B, L ≤ 128, C], key_mask [B, L] bool
        or None -> per-head softmax(q·kᵀ/√d)·v over the unmasked keys)
    torch.ops.qdiff.cross_attention_fp8(q, k, v, key_mask, num_heads, fast, backend) -> (codes, scale)
        (`qdiff.kernels.cross_attention.cross_attention_fp8`: the cross-attention's output quantized per token to
        e4m3, codes [B·N, C] float8_e4m3fn, scale [B·N, 1] float32)

Written without `from __future__ import annotations`: the op schemas are inferred from these annotations
(typing.Optional, as torch 2.11 expects).
"""
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
NO_STATIC = float("nan")  # static_delta / static_zero when the activation range is dynamic


# ------------------------------------------------------------------------------------------ integer GEMM
@torch.library.custom_op("qdiff::int_gemm", mutates_args=())
def int_gemm_op(a: Tensor, a_scale: Tensor, a_zero: Optional[Tensor], a_rowsum: Optional[Tensor], w: Tensor,
                w_scale: Tensor, w_zero: Optional[Tensor], w_colsum: Optional[Tensor], bias: Optional[Tensor],
                proj: Optional[Tensor], post_b: Optional[Tensor], out_dtype: torch.dtype, k: int,
                backend: str) -> Tensor:
    """`qdiff.kernels.int_gemm.int_gemm` (k = K for int4x2 weights, 0 for int8 weights)."""
    from qdiff.kernels.int_gemm import int_gemm

    def dense(t):  # the compiler may hand over other strides than eager made; the kernels need row-major operands
        return None if t is None else t.contiguous()

    return int_gemm(a.contiguous(), a_scale.contiguous(), dense(a_zero), dense(a_rowsum), w, w_scale, dense(w_zero),
                    dense(w_colsum), bias=bias, proj=proj, post_b=post_b, out_dtype=out_dtype, k=k or None,
                    backend=backend)


@int_gemm_op.register_fake
def _int_gemm_fake(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, proj, post_b, out_dtype, k,
                   backend):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------------------ activation codes
@torch.library.custom_op("qdiff::quantize_per_token", mutates_args=())
def quantize_per_token_op(x: Tensor, bits: int, symmetric: bool, smooth_scale: Optional[Tensor],
                          static_delta: float, static_zero: float, post_a: Optional[Tensor],
                          frame_factor: Optional[Tensor], producer: int, shift: Optional[Tensor],
                          mscale: Optional[Tensor], rows_per_sample: int, eps: float,
                          backend: str, fast: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`qdiff.kernels.act_quant.quantize_per_token`; static range given as (Δ, z), NaN for dynamic; producer 0 (none),
    1 (LayerNorm + modulate with shift, mscale [B, K], rows_per_sample, eps) or 2 (GELU-tanh)."""
    from qdiff.kernels.act_quant import quantize_per_token
    from qdiff.kernels.fused_producers import make_producer

    static = None if static_delta != static_delta else (static_delta, static_zero)  # NaN: dynamic
    act = quantize_per_token(x, bits, symmetric, smooth_scale=smooth_scale, static=static, post_a=post_a,
                             frame_factor=frame_factor, producer=make_producer(producer, shift, mscale, rows_per_sample,
                                                                               eps), backend=backend, fast=fast)
    proj = act.proj if act.proj is not None else torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device)
    return act.codes, act.scale, act.zero, act.rowsum, proj


@quantize_per_token_op.register_fake
def _quantize_per_token_fake(x, bits, symmetric, smooth_scale, static_delta, static_zero, post_a, frame_factor,
                             producer, shift, mscale, rows_per_sample, eps, backend, fast):
    rows, cols = x.shape
    rank = 0 if post_a is None else post_a.shape[0]
    return (x.new_empty((rows, cols), dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.int32), x.new_empty((rows,), dtype=torch.int32),
            x.new_empty((rows, rank), dtype=torch.float32))


@torch.library.custom_op("qdiff::quantize_fp8_per_token", mutates_args=())
def quantize_fp8_per_token_op(x: Tensor, smooth_scale: Optional[Tensor], producer: int, shift: Optional[Tensor],
                              mscale: Optional[Tensor], rows_per_sample: int, eps: float, backend: str,
                              fast: bool) -> tuple[Tensor, Tensor]:
    """`qdiff.kernels.fp8_quant.quantize_fp8_per_token`; the producer as in `quantize_per_token`."""
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token
    from qdiff.kernels.fused_producers import make_producer

    return quantize_fp8_per_token(x, smooth_scale, make_producer(producer, shift, mscale, rows_per_sample, eps),
                                  backend=backend, fast=fast)


@quantize_fp8_per_token_op.register_fake
def _quantize_fp8_per_token_fake(x, smooth_scale, producer, shift, mscale, rows_per_sample, eps, backend, fast):
    rows, cols = x.shape
    return x.new_empty((rows, cols), dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("qdiff::quantize_per_token_residual", mutates_args=())
def quantize_per_token_residual_op(x: Tensor, y: Tensor, gate: Optional[Tensor], gate_rows_per_sample: int,
                                   table: Optional[Tensor], rows_per_frame: int, bits: int, symmetric: bool,
                                   smooth_scale: Optional[Tensor], static_delta: float, static_zero: float,
                                   post_a: Optional[Tensor], frame_factor: Optional[Tensor], producer: int,
                                   shift: Optional[Tensor], mscale: Optional[Tensor], rows_per_sample: int, eps: float,
                                   backend: str, fast: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`qdiff.kernels.act_quant.quantize_per_token_residual` with Residual(y, gate, gate_rows_per_sample, table,
    rows_per_frame); the other arguments and the first five outputs as `quantize_per_token`, then s."""
    from qdiff.kernels.act_quant import quantize_per_token_residual
    from qdiff.kernels.fused_producers import Residual, make_producer

    static = None if static_delta != static_delta else (static_delta, static_zero)  # NaN: dynamic
    residual = Residual(y, gate, gate_rows_per_sample, table, rows_per_frame)
    act, s = quantize_per_token_residual(x, residual, bits, symmetric,
                                         smooth_scale=smooth_scale, static=static, post_a=post_a,
                                         frame_factor=frame_factor,
                                         producer=make_producer(producer, shift, mscale, rows_per_sample, eps),
                                         backend=backend, fast=fast)
    proj = act.proj if act.proj is not None else torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device)
    return act.codes, act.scale, act.zero, act.rowsum, proj, s.contiguous()


@quantize_per_token_residual_op.register_fake
def _quantize_per_token_residual_fake(x, y, gate, gate_rows_per_sample, table, rows_per_frame, bits, symmetric,
                                      smooth_scale, static_delta, static_zero, post_a, frame_factor, producer, shift,
                                      mscale, rows_per_sample, eps, backend, fast):
    outputs = _quantize_per_token_fake(x, bits, symmetric, smooth_scale, static_delta, static_zero, post_a,
                                       frame_factor, producer, shift, mscale, rows_per_sample, eps, backend, fast)
    return (*outputs, x.new_empty(x.shape))


@torch.library.custom_op("qdiff::quantize_fp8_per_token_residual", mutates_args=())
def quantize_fp8_per_token_residual_op(x: Tensor, y: Tensor, gate: Optional[Tensor], gate_rows_per_sample: int,
                                       table: Optional[Tensor], rows_per_frame: int, smooth_scale: Optional[Tensor],
                                       producer: int, shift: Optional[Tensor], mscale: Optional[Tensor],
                                       rows_per_sample: int, eps: float, backend: str,
                                       fast: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`qdiff.kernels.fp8_quant.quantize_fp8_residual` with Residual(y, gate, gate_rows_per_sample, table,
    rows_per_frame): (codes, scale, s); the other arguments as `quantize_fp8_per_token`."""
    from qdiff.kernels.fp8_quant import quantize_fp8_residual
    from qdiff.kernels.fused_producers import Residual, make_producer

    residual = Residual(y, gate, gate_rows_per_sample, table, rows_per_frame)
    codes, scale, s = quantize_fp8_residual(x, residual, smooth_scale,
                                            make_producer(producer, shift, mscale, rows_per_sample, eps),
                                            backend=backend, fast=fast)
    return codes, scale, s.contiguous()


@quantize_fp8_per_token_residual_op.register_fake
def _quantize_fp8_per_token_residual_fake(x, y, gate, gate_rows_per_sample, table, rows_per_frame, smooth_scale,
                                          producer, shift, mscale, rows_per_sample, eps, backend, fast):
    return (*_quantize_fp8_per_token_fake(x, smooth_scale, producer, shift, mscale, rows_per_sample, eps, backend,
                                          fast), x.new_empty(x.shape))


@torch.library.custom_op("qdiff::project_codes", mutates_args=())
def project_codes_op(codes: Tensor, scale: Tensor, zero: Tensor, post_a: Tensor, frame_factor: Optional[Tensor],
                     backend: str) -> Tensor:
    """`qdiff.kernels.act_quant.project_codes` of the codes (rowsum is not read)."""
    from qdiff.kernels.act_quant import ActCodes, project_codes

    return project_codes(ActCodes(codes, scale, zero, zero, None), post_a, frame_factor, backend=backend)


@project_codes_op.register_fake
def _project_codes_fake(codes, scale, zero, post_a, frame_factor, backend):
    return codes.new_empty((codes.shape[0], post_a.shape[0]), dtype=torch.float32)


# ------------------------------------------------------------------------------------------ fake quantization
@torch.library.custom_op("qdiff::fake_quant_per_token", mutates_args=())
def fake_quant_per_token_op(x: Tensor, bits: int) -> Tensor:
    """`qdiff.kernels.fake_quant.fake_quant_per_token`."""
    from qdiff.kernels.fake_quant import fake_quant_per_token

    return fake_quant_per_token(x, bits)


@fake_quant_per_token_op.register_fake
def _fake_quant_per_token_fake(x, bits):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qdiff::fake_quant_weight", mutates_args=())
def fake_quant_weight_op(weight: Tensor, delta: Tensor, zero_point: Tensor, bits: int, symmetric: bool,
                         smooth: Optional[Tensor], low_rank: Optional[Tensor], post: Optional[Tensor],
                         post_b: Optional[Tensor], post_a: Optional[Tensor],
                         out_dtype: Optional[torch.dtype]) -> Tensor:
    """`qdiff.kernels.weight_quant.fake_quant_weight`; the rank-1 post term as (post_b, post_a), a full one as post."""
    from qdiff.kernels.weight_quant import fake_quant_weight

    pair = (post_b, post_a) if post_b is not None else post
    out = fake_quant_weight(weight, delta, zero_point, bits, symmetric, smooth=smooth, low_rank=low_rank, post=pair,
                            out_dtype=out_dtype)
    return out.clone() if out is weight else out  # never alias an input (the reference's .to may return it)


@fake_quant_weight_op.register_fake
def _fake_quant_weight_fake(weight, delta, zero_point, bits, symmetric, smooth, low_rank, post, post_b, post_a,
                            out_dtype):
    return weight.new_empty(weight.shape, dtype=out_dtype or weight.dtype)


# ------------------------------------------------------------------------------------------ short attention
@torch.library.custom_op("qdiff::short_attention", mutates_args=())
def short_attention_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, backend: str) -> Tensor:
    """`qdiff.kernels.short_attention.short_attention` (q, k, v [B, T, S, C] or [B', N, C] in any strides with channel
    stride 1)."""
    from qdiff.kernels.short_attention import short_attention

    return short_attention(q, k, v, num_heads, backend=backend)


@short_attention_op.register_fake
def _short_attention_fake(q, k, v, num_heads, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, T, S, C] or [B', N, C], contiguous


# ------------------------------------------------------------------------------------------ cross-attention
@torch.library.custom_op("qdiff::cross_attention", mutates_args=())
def cross_attention_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_heads: int,
                       backend: str) -> Tensor:
    """`qdiff.kernels.cross_attention.cross_attention` (q [B, N, C], k, v [B, L, C] in any strides with channel
    stride 1, key_mask [B, L] bool or None)."""
    from qdiff.kernels.cross_attention import cross_attention

    return cross_attention(q, k, v, key_mask, num_heads, backend=backend)


@cross_attention_op.register_fake
def _cross_attention_fake(q, k, v, key_mask, num_heads, backend):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, N, C], contiguous


@torch.library.custom_op("qdiff::cross_attention_fp8", mutates_args=())
def cross_attention_fp8_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_heads: int, fast: bool,
                           backend: str) -> Tuple[Tensor, Tensor]:
    """`qdiff.kernels.cross_attention.cross_attention_fp8` (as cross_attention, the output as e4m3 codes + scales)."""
    from qdiff.kernels.cross_attention import cross_attention_fp8

    return cross_attention_fp8(q, k, v, key_mask, num_heads, fast=fast, backend=backend)


@cross_attention_fp8_op.register_fake
def _cross_attention_fp8_fake(q, k, v, key_mask, num_heads, fast, backend):
    rows = q.shape[0] * q.shape[1]
    return (torch.empty(rows, q.shape[2], dtype=torch.float8_e4m3fn, device=q.device),
            torch.empty(rows, 1, dtype=torch.float32, device=q.device))
