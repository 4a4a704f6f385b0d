"""FP8 (e4m3) quantization: one definition shared by the fake-quant simulation and the FP8 GEMM path.

For a row x[m, :] (activations: one token; weights: one output channel), in float32 whatever x's dtype:
    s_m = max(max_k |x[m, k]|, 1e-12) / 448                       the row's scale (absmax maps to 448)
    q[m, k] = e4m3(clamp(x[m, k] / s_m, −448, 448))                 torch's cast: round to nearest, ties to even
    x̂[m, k] = float(q[m, k]) · s_m
448 is the largest finite float8_e4m3fn. The clamp comes before the cast, so nothing ever depends on how a cast
treats out-of-range values (it differs between devices); |x / s| can exceed 448 only by the rounding of the division.
The 1e-12 floor only matters for rows that are all zero (or nearly): they quantize to zeros (signs kept: −0.0
stays −0.0) instead of dividing by zero. Everything is plain torch ops, so under torch.compile inductor fuses the
absmax, the division and the cast into the kernel that produces x.

Integers of magnitude ≤ 16 are exact in e4m3 (3 mantissa bits), so integer weight codes minus their zero point
are exact there when |q − z| ≤ 16: affine grids of ≤ 4 bits, symmetric grids of ≤ 5 bits (`exact_in_e4m3`).
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_ABSMAX = 1e-12  # floor of a row's absmax (all-zero rows)
FORMATS = ("int", "fp8_e4m3")
FP8_FORMAT = "fp8_e4m3"
EXACT_INT_MAGNITUDE = 16  # every integer in [−16, 16] is an e4m3 value


def fp8_row_scale(x32: torch.Tensor) -> torch.Tensor:
    """Per-row scale of x32 [..., K] float32 -> s [..., 1] float32 (absmax / 448, absmax floored at 1e-12)."""
    return x32.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX) / FP8_MAX


def to_fp8(x32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of x32 / scale, saturated at ±448 before the cast. x32 float32, scale broadcastable."""
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


class _CastSTE(torch.autograd.Function):
    """y -> float(e4m3(y)) with the identity gradient (y already clamped to ±448)."""

    @staticmethod
    def forward(ctx, y):
        return y.to(FP8_DTYPE).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = float(e4m3(clamp(x / s, ±448)))·s in float32, differentiable: straight-through rounding, so x gets the
    identity gradient inside the range (zero where the clamp saturates) and s gets (q − x/s) summed, as the integer
    quantizers' Δ does (`qdiff.quantizers.uniform.fake_quant`). x float32 [...], scale broadcastable to x."""
    y = (x / scale).clamp(-FP8_MAX, FP8_MAX)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _CastSTE.apply(y) * scale
    return y.to(FP8_DTYPE).float() * scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (codes float8_e4m3fn [M, K], scale float32 [M, 1]): the activation side of the
    FP8 GEMM. Plain torch ops (see the module docstring)."""
    x32 = x.float()
    scale = fp8_row_scale(x32)
    return to_fp8(x32, scale), scale


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x̂ [..., K] in x's dtype: per-row (per-token) FP8 fake quantization, differentiable (the scale
    stays attached to the graph, as the integer dynamic quantizer's Δ does)."""
    x32 = x.float()
    return fake_quant_fp8(x32, fp8_row_scale(x32)).to(x.dtype)


def exact_in_e4m3(bits: int, symmetric: bool) -> bool:
    """Whether every q − z of a `bits` integer grid is an e4m3 value (|q − z| ≤ 16)."""
    largest = 2 ** (bits - 1) if symmetric else 2**bits - 1
    return largest <= EXACT_INT_MAGNITUDE
