"""Dynamic per-token fake quantization: one fused pass (read x, write x̂) instead of ~10 eager kernels.

For each row x[i, :] of x [M, C] (asymmetric, b bits, q_max = 2^b − 1):
    lo = min(min_j x_ij, 0),  hi = max(max_j x_ij, 0)
    Δ_i = max((hi − lo) / q_max, 1e-6),  z_i = round(−lo / Δ_i)
    x̂_ij = (clamp(round(x_ij / Δ_i) + z_i, 0, q_max) − z_i) · Δ_i
Arithmetic in float32 whatever the input dtype; x̂ is returned in x's dtype. `round` is
round-half-to-even, as torch.round, and the divisions are IEEE (`div_rn`): the kernel computes the
reference's formula exactly (checked bit for bit under the Triton interpreter; on a GPU torch's own
reference divides by q_max through a reciprocal, so the two may differ by one step on rare ties). Rows per program, chunk width and warps are autotuned per row length.
Forward only: use the autograd-aware quantizer for training.
"""
from __future__ import annotations

import os

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)

MIN_DELTA = 1e-6
# Under Triton's CPU interpreter (TRITON_INTERPRET=1, set before import) the kernels also take CPU
# tensors: that is how CI checks them against the references without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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


try:  # Triton is optional: CPU-only installs use the reference path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    @triton.jit
    def rint_half_even(t):
        """Round half to even in fp32 (as torch.round): adding and removing 1.5·2²³ leaves the rounded value.
        |t| ≥ 2²² is passed through: such floats are integers or halves the clamps that follow remove."""
        rounded = (t + 12582912.0) - 12582912.0
        return tl.where(tl.abs(t) < 4194304.0, rounded, t)

    _CHUNKED_CONFIGS = [triton.Config({"ROWS": rows, "CHUNK": chunk}, num_warps=warps)
                        for rows in (4, 8, 16) for chunk in (128, 256) for warps in (4, 8)]

    @triton.autotune(configs=_CHUNKED_CONFIGS, key=["n_cols"])
    @triton.jit
    def fake_quant_rows_chunked(x_ptr, y_ptr, n_rows, n_cols: tl.constexpr, stride_x, stride_y, q_max, min_delta,
                                ROWS: tl.constexpr, CHUNK: tl.constexpr):
        """Two passes over column chunks of each row (min/max, then quantize; the re-read hits the cache).
        No lanes are wasted on padding a row to a power of two, and tiles stay small: 1.6x the bandwidth of
        a whole-row-in-registers kernel at 1152 columns on an H100. The row length is a compile-time
        constant (a model has a handful of widths), so the loops unroll. The range is kept element-wise over the
        chunks and reduced once after the loop: Triton 3.6's TritonGPUOptimizeThreadLocality pass, which rewrites
        reductions inside loops, fails on some widths on sm_90."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
        row_ok = rows < n_rows
        lo = tl.zeros([ROWS, CHUNK], dtype=tl.float32)  # starting at 0 is the clamp min(·, 0) / max(·, 0)
        hi = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
        for start in range(0, n_cols, CHUNK):
            cols = start + tl.arange(0, CHUNK)[None, :]
            x = tl.load(x_ptr + rows * stride_x + cols, mask=row_ok & (cols < n_cols), other=0.0).to(tl.float32)
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
        lo, hi = tl.min(lo, axis=1), tl.max(hi, axis=1)
        delta = tl.maximum(tl.math.div_rn(hi - lo, q_max), min_delta)[:, None]
        zero_point = rint_half_even(tl.math.div_rn(-lo[:, None], delta))
        for start in range(0, n_cols, CHUNK):
            cols = start + tl.arange(0, CHUNK)[None, :]
            valid = row_ok & (cols < n_cols)
            x = tl.load(x_ptr + rows * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(rint_half_even(tl.math.div_rn(x, delta)) + zero_point, 0.0), q_max)
            tl.store(y_ptr + rows * stride_y + cols, ((q - zero_point) * delta).to(y_ptr.dtype.element_ty), mask=valid)


def _kernel():
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package (pip install triton)")
    return triton, fake_quant_rows_chunked


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fused Triton kernel on CUDA tensors, the reference elsewhere. x [..., C] -> x̂ [..., C].

    Under torch.compile: the custom op `torch.ops.qdiff.fake_quant_per_token` (same dispatch, run eagerly).
    """
    if torch.compiler.is_compiling():
        return _ops.fake_quant_per_token_op(x, bits)
    if not (x.is_cuda or INTERPRET):
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
    n_rows = x2.shape[0]
    args = (x2, y, n_rows, n_cols, x2.stride(0), y.stride(0), float(2**bits - 1), MIN_DELTA)
    if INTERPRET:  # the interpreter cannot time configs: run one
        kernel.fn[(triton.cdiv(n_rows, 4),)](*args, ROWS=4, CHUNK=32)
    else:
        kernel[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](*args)
    return y.reshape(x.shape)
