"""Dynamic per-token fake quantization: one fused pass (read x, write x̂) instead of ~10 eager kernels.

For each row x[i, :] of x [M, C] (asymmetric, b bits, q_max = 2^b − 1):
    lo = min(min_j x_ij, 0),  hi = max(max_j x_ij, 0)
    Δ_i = max((hi − lo) / q_max, 1e-6),  z_i = round(−lo / Δ_i)
    x̂_ij = (clamp(round(x_ij / Δ_i) + z_i, 0, q_max) − z_i) · Δ_i
Arithmetic in float32 whatever the input dtype; x̂ is returned in x's dtype. `round` is
round-half-to-even, as torch.round. Forward only: use the autograd-aware quantizer for training.
"""
from __future__ import annotations

import functools

import torch

MIN_DELTA = 1e-6


def fake_quant_per_token_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The pure-PyTorch definition (float32 math). x [..., C] -> x̂ [..., C] in x.dtype."""
    x32 = x.float()
    q_max = 2**bits - 1
    lo = x32.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = x32.amax(dim=-1, keepdim=True).clamp(min=0.0)
    delta = ((hi - lo) / q_max).clamp(min=MIN_DELTA)
    zero_point = torch.round(-lo / delta)
    q = torch.clamp(torch.round(x32 / delta) + zero_point, 0, q_max)
    return ((q - zero_point) * delta).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def fake_quant_rows(x_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, q_max, min_delta,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        valid = (rows < n_rows) & (cols < n_cols)
        x = tl.load(x_ptr + rows * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
        lo = tl.minimum(tl.min(x, axis=1), 0.0)[:, None]  # padding reads 0, which the clamps include anyway
        hi = tl.maximum(tl.max(x, axis=1), 0.0)[:, None]
        delta = tl.maximum(tl.math.div_rn(hi - lo, q_max), min_delta)
        zero_point = libdevice.rint(tl.math.div_rn(-lo, delta))
        q = libdevice.rint(tl.math.div_rn(x, delta)) + zero_point
        q = tl.minimum(tl.maximum(q, 0.0), q_max)
        tl.store(y_ptr + rows * stride_y + cols, ((q - zero_point) * delta).to(y_ptr.dtype.element_ty), mask=valid)

    return triton, fake_quant_rows


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _kernel()
    except Exception:  # no triton, or a triton that cannot compile here
        return False
    return True


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fused Triton kernel on CUDA tensors, the reference elsewhere. x [..., C] -> x̂ [..., C]."""
    if not x.is_cuda:
        return fake_quant_per_token_reference(x, bits)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits: expected 2..8, got {bits}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fake_quant_per_token: unsupported dtype {x.dtype}")
    triton, kernel = _kernel()
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], n_cols), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(n_cols)
    rows = max(1, 4096 // block)  # ~4K elements per program
    n_rows = x2.shape[0]
    kernel[(triton.cdiv(n_rows, rows),)](x2, y, n_rows, n_cols, x2.stride(0), y.stride(0), float(2**bits - 1),
                                         MIN_DELTA, ROWS=rows, BLOCK=block, num_warps=8)
    return y.reshape(x.shape)
