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

Activations of the FP8 GEMM: `quantize_fp8_per_token(x, smooth_scale=None, producer=None, backend="torch",
fast=False)` quantizes the rows of v = producer(x) / s (x [M, K]; the optional fused producer of
`qdiff.kernels.fused_producers`, LayerNorm + adaLN modulation or GELU-tanh, and the optional smoothing scale s [K],
each op rounded to x's dtype as the eager ops are) to (codes float8_e4m3fn [M, K], scale float32 [M, 1]) with the
math above. Backends: "torch" (the default) is the reference in plain torch ops, eager and under torch.compile
(where inductor fuses it, as before); "auto" runs the Triton kernel (`triton_fp8_act_quant`, producer and
quantization in one pass) on CUDA and the reference elsewhere; "triton" always the kernel. Under torch.compile
"auto" and "triton" are the opaque custom op `torch.ops.qdiff.quantize_fp8_per_token` (`qdiff.kernels.ops`).
The kernel divides as torch does (IEEE), so without a producer its codes and scales equal the CPU reference's bit for
bit, and so they did with LayerNorm + modulate on bf16 inputs (H100); torch's own LayerNorm moments (float32 inputs)
and GELU formula (0.5·x·(1 + tanh u), which cancels for x < 0) differ from the kernel's in the last bits, so there a
code moves by one e4m3 step now and then (≤ 0.05% measured). fast=True multiplies by one reciprocal per row (and
divides approximately in smoothing) and, on NVIDIA GPUs, computes GELU's tanh with the one-instruction
`tanh.approx.f32` (`fused_producers.hardware_tanh`): a code may move by one step where v/s lies within an ulp of a
rounding boundary (≤ 0.1% measured), with the GELU on 0.17% of the codes (H100, [32768, 4608]). (CUDA's torch
divides a tensor by the Python scalar 448 through its reciprocal, so the eager CUDA reference's scales can differ
from the kernel's in the last bit.)

Residual step: `quantize_fp8_residual(x, residual, smooth_scale=None, producer=None, backend, fast)` computes
s = x + gate·y first (`qdiff.kernels.fused_producers.Residual`, the eager `x + gate * y` rounded as eager rounds
it), returns it as the new residual stream with the codes and scales of producer(u) / s_smooth: (codes, scale, s),
one kernel pass (custom op `torch.ops.qdiff.quantize_fp8_per_token_residual` under torch.compile). u = s, or, when
the residual carries a per-frame table [T, K] (the temporal attention's `x + temporal_pos_embed`),
u = s + table[(m // rows_per_frame) % T] rounded to x's dtype (`Residual.add_table`); the returned s never holds
the table. The sum, the product and the table add are exact float32 operations each rounded once to x's dtype, so
s and u equal the eager ones bit for bit.

Integers of magnitude ≤ 16 are exact in e4m3 (3 mantissa bits), so integer weight codes minus their zero point
are exact there when |q − z| ≤ 16: affine grids of ≤ 4 bits, symmetric grids of ≤ 5 bits (`exact_in_e4m3`).
"""
from __future__ import annotations

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.act_quant import (interpret_mode, kernel_inputs, load_triton_kernels, residual_inputs, smooth_input,
                                     triton_available)
from qdiff.kernels.fused_producers import NONE, GeluTanh, LayerNormModulate, Residual, hardware_tanh, producer_args

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_ABSMAX = 1e-12  # floor of a row's absmax (all-zero rows)
FORMATS = ("int", "fp8_e4m3")
FP8_FORMAT = "fp8_e4m3"
EXACT_INT_MAGNITUDE = 16  # every integer in [−16, 16] is an e4m3 value
FP8_QUANT_BACKENDS = ("torch", "auto", "triton")


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


def quantize_fp8_per_token_reference(x: torch.Tensor, smooth_scale: torch.Tensor | None = None,
                                     producer: LayerNormModulate | GeluTanh | None = None
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype; [..., K] without a producer) -> (codes float8_e4m3fn [M, K], scale float32 [M, 1])
    of producer.apply(x) / s. Plain torch ops (see the module docstring)."""
    if producer is not None:
        x = producer.apply(x)
    x32 = smooth_input(x, smooth_scale).float()
    scale = fp8_row_scale(x32)
    return to_fp8(x32, scale), scale


def quantize_fp8_per_token_triton(x: torch.Tensor, smooth_scale: torch.Tensor | None = None,
                                  producer: LayerNormModulate | GeluTanh | None = None,
                                  config: tuple[int, int, int] | None = None,
                                  fast: bool = False, residual: Residual | None = None) -> tuple[torch.Tensor, ...]:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference,
    x [M, K] float32, float16 or bfloat16. config: (ROWS, BLOCK_K, num_warps) to skip autotuning (the interpreter
    always needs one); a row up to a quarter longer than BLOCK_K is read whole, with a tail piece. fast: one
    reciprocal per row instead of IEEE division (see the module docstring). residual: run the residual step (and its
    table add) first and return (codes, scale, s) as `quantize_fp8_residual_reference`."""
    import triton

    x, smooth, shift, mscale, rows_per_sample, eps = kernel_inputs(x, smooth_scale, producer,
                                                                    "quantize_fp8_per_token")
    y, gate, out, gate_rows_per_sample, stride_gate, residual_kind, table, rows_per_frame, frames = \
        residual_inputs(x, residual, "quantize_fp8_per_token")
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    result = (codes, scale) if residual is None else (codes, scale, out)
    if rows == 0:
        return result
    args = (x, x if smooth is None else smooth, shift, mscale, codes, scale, y, gate, out, table, rows, cols,
            x.stride(0), codes.stride(0), rows_per_sample, shift.stride(0), eps, y.stride(0), out.stride(0),
            gate_rows_per_sample, stride_gate, rows_per_frame, frames)
    flags = dict(SMOOTH=smooth is not None, PRODUCER=NONE if producer is None else producer.kind, FAST=bool(fast),
                 RESIDUAL=residual_kind, TABLE=frames > 0, HW_TANH=hardware_tanh(x.device, fast))
    # LayerNorm + modulate and the residual step: no fma contraction, each op keeps its rounding (see
    # triton_fp8_act_quant)
    flags["enable_fp_fusion"] = not (isinstance(producer, LayerNormModulate) or residual is not None)
    kernels = _triton_module()
    if config is None and not interpret_mode():
        kernels.fp8_act_quant_tuned[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](*args, **flags)
    else:
        block_rows, block_k, warps = config or (16, 64, 4)
        tail = kernels.tail_width(cols, block_k)
        kernels.fp8_act_quant_kernel[(triton.cdiv(rows, block_rows),)](
            *args, **flags, ONE_CHUNK=cols <= block_k + tail, TAIL_K=tail, ROWS=block_rows, BLOCK_K=block_k,
            num_warps=warps)
    return result


def quantize_fp8_per_token(x: torch.Tensor, smooth_scale: torch.Tensor | None = None,
                           producer: LayerNormModulate | GeluTanh | None = None, backend: str = "torch",
                           fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M, K], scale float32 [M, 1]) of producer.apply(x) / s: the activation side
    of the FP8 GEMM. backend "torch" (plain torch ops, also under torch.compile), "auto" (Triton on CUDA, the
    reference elsewhere) or "triton"; fast: the kernel's approximate division (see the module docstring)."""
    if backend not in FP8_QUANT_BACKENDS:
        raise ValueError(f"backend: expected one of {list(FP8_QUANT_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return quantize_fp8_per_token_reference(x, smooth_scale, producer)
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.quantize_fp8_per_token_op(x, smooth_scale, *producer_args(producer), backend, fast)
    if backend == "triton" or (x.is_cuda and triton_available(x.device)):
        return quantize_fp8_per_token_triton(x, smooth_scale, producer, fast=fast)
    return quantize_fp8_per_token_reference(x, smooth_scale, producer)


def quantize_fp8_residual_reference(x: torch.Tensor, residual: Residual, smooth_scale: torch.Tensor | None = None,
                                    producer: LayerNormModulate | GeluTanh | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """s = residual.apply(x) (the eager `x + gate * y`), then `quantize_fp8_per_token_reference` of u =
    residual.add_table(s) (s itself without a table): (codes, scale of u; s), x [M, K]."""
    s = residual.apply(x)
    return (*quantize_fp8_per_token_reference(residual.add_table(s), smooth_scale, producer), s)


def quantize_fp8_residual(x: torch.Tensor, residual: Residual, smooth_scale: torch.Tensor | None = None,
                          producer: LayerNormModulate | GeluTanh | None = None, backend: str = "torch",
                          fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes, scale, s): s = x + gate·y [M, K] in x's dtype (the new residual stream) and the FP8 codes
    of producer(u) / s_smooth, u = s (+ the residual's per-frame table), from one kernel pass; backends and dispatch
    as `quantize_fp8_per_token`."""
    if backend not in FP8_QUANT_BACKENDS:
        raise ValueError(f"backend: expected one of {list(FP8_QUANT_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return quantize_fp8_residual_reference(x, residual, smooth_scale, producer)
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.quantize_fp8_per_token_residual_op(x, residual.y, residual.gate, residual.rows_per_sample,
                                                       residual.table, residual.rows_per_frame, smooth_scale,
                                                       *producer_args(producer), backend, fast)
    if backend == "triton" or (x.is_cuda and triton_available(x.device)):
        return quantize_fp8_per_token_triton(x, smooth_scale, producer, fast=fast, residual=residual)
    return quantize_fp8_residual_reference(x, residual, smooth_scale, producer)


def _triton_module():
    return load_triton_kernels("triton_fp8_act_quant")


def e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values apart the codes a and b (float8_e4m3fn, same shape) are, int32 (±0 are one value)."""
    def index(codes):  # signed position on the number line: neighbouring values differ by 1
        bits = codes.view(torch.uint8).int()
        return torch.where(bits >= 0x80, -(bits & 0x7F), bits & 0x7F)

    return (index(a) - index(b)).abs()


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x̂ [..., K] in x's dtype: per-row (per-token) FP8 fake quantization, differentiable (the scale
    stays attached to the graph, as the integer dynamic quantizer's Δ does)."""
    x32 = x.float()
    return fake_quant_fp8(x32, fp8_row_scale(x32)).to(x.dtype)


def exact_in_e4m3(bits: int, symmetric: bool) -> bool:
    """Whether every q − z of a `bits` integer grid is an e4m3 value (|q − z| ≤ 16)."""
    largest = 2 ** (bits - 1) if symmetric else 2**bits - 1
    return largest <= EXACT_INT_MAGNITUDE
