"""Fused weight fake quantization for the unfolded QuantLinear forward (no-grad path).

`QuantLinear.effective_weight` in eager PyTorch is ~10 fp32 elementwise kernels over every weight:
    W' = W·s   (+ B·A)   ->   Ŵ = (clamp(round(W'/Δ) + z, q_min, q_max) − z)·Δ   (+ B_out·A_out)   -> cast
This module does that chain in one Triton pass (read W and the low-rank product, write Ŵ in the
output dtype). The low-rank products themselves stay cuBLAS GEMMs computed by the caller, and the
kernel repeats the eager fp32 operations one for one (IEEE division, round-half-even), so the result
equals the eager path bit for bit. Forward only: training keeps the autograd-aware eager path.
"""
from __future__ import annotations

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.fake_quant import INTERPRET


def fake_quant_weight_reference(
    weight: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
    smooth: torch.Tensor | None = None, low_rank: torch.Tensor | None = None,
    post: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The eager definition (fp32 math), same arguments as `fake_quant_weight`."""
    from qdiff.quantizers.uniform import quant_range

    d_out, d_in = weight.shape
    groups = delta.shape[-1]
    w = weight.float()
    if smooth is not None:
        w = w * smooth
    if low_rank is not None:
        w = w + low_rank
    w = w.reshape(d_out, groups, d_in // groups)
    delta, zero_point = delta.reshape(d_out, groups, 1), zero_point.reshape(d_out, groups, 1)
    q_min, q_max = quant_range(bits, symmetric)
    if symmetric:
        w = torch.clamp(torch.round(w / delta), q_min, q_max) * delta
    else:
        w = (torch.clamp(torch.round(w / delta) + zero_point, q_min, q_max) - zero_point) * delta
    w = w.reshape(d_out, d_in)
    if isinstance(post, tuple):
        w = w + post[0] * post[1]
    elif post is not None:
        w = w + post
    return w.to(out_dtype or weight.dtype)


try:  # Triton is optional: CPU-only installs use the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    from qdiff.kernels.fake_quant import rint_half_even

    @triton.jit
    def fake_quant_weight_tiles(
        w_ptr, s_ptr, lr_ptr, post_ptr, post_b_ptr, post_a_ptr, delta_ptr, zp_ptr, out_ptr,
        d_out, d_in, group_size, n_groups, q_min, q_max,
        HAS_SMOOTH: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_POST: tl.constexpr, POST_RANK1: tl.constexpr,
        SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # [BLOCK_R, 1]
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
        valid = (rows < d_out) & (cols < d_in)
        offsets = rows.to(tl.int64) * d_in + cols
        w = tl.load(w_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            w = w * tl.load(s_ptr + cols, mask=cols < d_in, other=1.0)
        if HAS_LOW_RANK:
            w = w + tl.load(lr_ptr + offsets, mask=valid, other=0.0)
        q_offsets = rows * n_groups + cols // group_size
        delta = tl.load(delta_ptr + q_offsets, mask=valid, other=1.0)
        q = rint_half_even(tl.math.div_rn(w, delta))
        if SYMMETRIC:
            w = tl.minimum(tl.maximum(q, q_min), q_max) * delta
        else:
            zero_point = tl.load(zp_ptr + q_offsets, mask=valid, other=0.0)
            w = (tl.minimum(tl.maximum(q + zero_point, q_min), q_max) - zero_point) * delta
        if HAS_POST:
            w = w + tl.load(post_ptr + offsets, mask=valid, other=0.0)
        if POST_RANK1:  # b_out [d_out, 1] * a_out [1, d_in], one fp32 product per element as in eager
            b = tl.load(post_b_ptr + rows, mask=rows < d_out, other=0.0)
            a = tl.load(post_a_ptr + cols, mask=cols < d_in, other=0.0)
            w = w + b * a
        tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=valid)


def _kernel():
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package (pip install triton)")
    return triton, fake_quant_weight_tiles


def fake_quant_weight(
    weight: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool,
    smooth: torch.Tensor | None = None, low_rank: torch.Tensor | None = None,
    post: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Ŵ = Q(W·s + low_rank) + post, cast to `out_dtype` (default: W's dtype).

    Args:
        weight: W [d_out, d_in], any float dtype.
        delta, zero_point: [d_out, G] fp32 (G groups of d_in/G input channels; G = 1 per channel).
        smooth: s [d_in] fp32 or None.  low_rank: B·A [d_out, d_in] fp32 or None.
        post: B_out·A_out [d_out, d_in] fp32, or the rank-1 pair (b_out [d_out, 1], a_out [1, d_in]) whose
            broadcast product is added (formed in the kernel), or None.
    One Triton pass on CUDA; the eager reference elsewhere. Not differentiable. Under torch.compile: the custom
    op `torch.ops.qdiff.fake_quant_weight` (same dispatch, run eagerly, so compiled and eager weights are equal).
    """
    if torch.compiler.is_compiling():
        post_b = post_a = None
        if isinstance(post, tuple):
            (post_b, post_a), post = post, None
        return _ops.fake_quant_weight_op(weight, delta, zero_point, bits, symmetric, smooth, low_rank, post,
                                                 post_b, post_a, out_dtype)
    if not (weight.is_cuda or INTERPRET):
        return fake_quant_weight_reference(weight, delta, zero_point, bits, symmetric, smooth, low_rank, post, out_dtype)
    from qdiff.quantizers.uniform import quant_range

    triton, kernel = _kernel()
    d_out, d_in = weight.shape
    groups = delta.shape[-1]
    weight = weight.contiguous()
    post_b = post_a = None
    if isinstance(post, tuple):
        (post_b, post_a), post = post, None
    fp32 = [None if t is None else t.detach().float().contiguous()
            for t in (smooth, low_rank, post, post_b, post_a, delta, zero_point)]
    smooth, low_rank, post, post_b, post_a, delta, zero_point = fp32
    out = torch.empty((d_out, d_in), device=weight.device, dtype=out_dtype or weight.dtype)
    q_min, q_max = quant_range(bits, symmetric)
    block_r, block_c = 16, 256
    grid = (triton.cdiv(d_out, block_r), triton.cdiv(d_in, block_c))
    dummy = delta  # never read when the matching HAS_* flag is off
    kernel[grid](
        weight, smooth if smooth is not None else dummy, low_rank if low_rank is not None else dummy,
        post if post is not None else dummy, post_b if post_b is not None else dummy,
        post_a if post_a is not None else dummy, delta, zero_point, out,
        d_out, d_in, d_in // groups, groups, float(q_min), float(q_max),
        HAS_SMOOTH=smooth is not None, HAS_LOW_RANK=low_rank is not None, HAS_POST=post is not None,
        POST_RANK1=post_b is not None,
        SYMMETRIC=symmetric, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        enable_fp_fusion=False,  # no FMA contraction: the eager path rounds after every multiply and add
    )
    return out
