"""The per-frame rank-1 TQE term of temporal linears, added to y in one pass.

QuantLinear's temporal layers add m_t · (x·a_out)·b_outᵀ to y = x·W_effᵀ (+ bias) for every frame t
(METHOD.md §4; x [B·S, T, d_in], a_out [1, d_in], b_out [d_out, 1], m [1, T, 1]). Eagerly that is a
GEMV, a broadcast multiply and a K=1 `addmm` over y; this kernel reads x and y once and writes y in place.
Rounding follows the eager bf16/fp16 path: x·a is rounded to x's dtype, so is its product with m_t, and
the update y + (m_t·x·a)·b is computed in fp32 and rounded once. Forward only.
"""
from __future__ import annotations

import torch

from qdiff.kernels.fake_quant import INTERPRET

try:  # Triton is optional: CPU-only installs use the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def frame_rank1_update_reference(y: torch.Tensor, x: torch.Tensor, a_out: torch.Tensor, b_out: torch.Tensor,
                                 frame_scale: torch.Tensor) -> torch.Tensor:
    """The eager definition: returns y + m_t·(x·a_outᵀ)·b_outᵀ (new tensor), shapes as `frame_rank1_update_`."""
    low = torch.nn.functional.linear(x, a_out.to(x.dtype)) * frame_scale.to(x.dtype)  # [B·S, T, 1]
    return torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, 1), b_out.to(x.dtype).t()).reshape(y.shape)


if triton is not None:
    @triton.jit
    def _frame_rank1_rows(y_ptr, x_ptr, a_ptr, b_ptr, m_ptr, n_rows, d_in, d_out, n_frames,
                          ROWS: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        row_ok = rows < n_rows
        cin = tl.arange(0, BLOCK_IN)
        x = tl.load(x_ptr + rows[:, None] * d_in + cin[None, :], mask=row_ok[:, None] & (cin < d_in)[None, :],
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + cin, mask=cin < d_in, other=0.0).to(tl.float32)
        low = tl.sum(x * a[None, :], axis=1).to(y_ptr.dtype.element_ty)  # rounded like F.linear's output
        m = tl.load(m_ptr + rows % n_frames, mask=row_ok, other=0.0)
        low = (low.to(tl.float32) * m.to(tl.float32)).to(y_ptr.dtype.element_ty).to(tl.float32)
        cout = tl.arange(0, BLOCK_OUT)
        b = tl.load(b_ptr + cout, mask=cout < d_out, other=0.0).to(tl.float32)
        y_offsets = rows[:, None] * d_out + cout[None, :]
        y_mask = row_ok[:, None] & (cout < d_out)[None, :]
        y = tl.load(y_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offsets, (y + low[:, None] * b[None, :]).to(y_ptr.dtype.element_ty), mask=y_mask)


def frame_rank1_update_(y: torch.Tensor, x: torch.Tensor, a_out: torch.Tensor, b_out: torch.Tensor,
                        frame_scale: torch.Tensor) -> torch.Tensor:
    """y += m_t·(x·a_outᵀ)·b_outᵀ in place and return y.

    Args:
        y: [B·S, T, d_out] contiguous.  x: [B·S, T, d_in] (same dtype as y).
        a_out: [1, d_in].  b_out: [d_out, 1].  frame_scale: m [1, T, 1].
    One Triton pass on CUDA (or under the Triton interpreter); the eager reference elsewhere.
    """
    if not (y.is_cuda or INTERPRET) or triton is None:
        y.copy_(frame_rank1_update_reference(y, x, a_out, b_out, frame_scale))
        return y
    n_frames, d_in, d_out = x.shape[-2], x.shape[-1], y.shape[-1]
    x2 = x.reshape(-1, d_in).contiguous()
    if not y.is_contiguous():
        raise ValueError("frame_rank1_update_: y must be contiguous")
    n_rows = x2.shape[0]
    block_in, block_out = triton.next_power_of_2(d_in), triton.next_power_of_2(d_out)
    rows = max(1, 8192 // max(block_in, block_out))
    _frame_rank1_rows[(triton.cdiv(n_rows, rows),)](
        y, x2, a_out.detach().reshape(-1).contiguous(), b_out.detach().reshape(-1).contiguous(),
        frame_scale.detach().reshape(-1).to(y.dtype).contiguous(), n_rows, d_in, d_out, n_frames,
        ROWS=rows, BLOCK_IN=block_in, BLOCK_OUT=block_out, num_warps=8,
    )
    return y
