"""Dynamic per-token activation quantization to integer codes (the input side of an integer GEMM).

For each row x[m, :] of x [M, K] (after the optional fused producer, `qdiff.kernels.fused_producers`, and the
optional smoothing division x / s, each rounded to x's dtype as the eager ops are), with b bits and the code
convention of `qdiff.lowbit.pack`:
  affine, dynamic    lo = min(min_k x, 0), hi = max(max_k x, 0), Δ = max((hi − lo)/(2^b − 1), 1e-6),
                     z = round(−lo/Δ), q = clamp(round(x/Δ) + z, 0, 2^b − 1)
  symmetric, dynamic Δ = max(max(−lo, hi)/(2^(b−1) − 1), 1e-6), z = 0, q = clamp(round(x/Δ), −2^(b−1), 2^(b−1) − 1)
  static             Δ and z given (one calibrated range per tensor), q as above
  code c = q − 2^(b−1) (affine) or q (symmetric), zero code z_c = z − 2^(b−1) or 0, stored as int8.
This is exactly the grid of `DynamicActQuantizer` / `fake_quant_per_token` (float32 math, IEEE division,
round half to even), so (c − z_c)·Δ equals their x̂ bit for bit. A6 codes live in int8 on the 6-bit grid.
Also returned, for the GEMM epilogue: the code row sums Σ_k c[m, k] (asymmetric-weight correction) and,
for TQE's post-quantizer term, proj[m, j] = f_m · Σ_k x̂[m, k]·A_out[j, k] with the optional per-row factor
f_m = frame_factor[m mod T] (temporal layers: 1 + m_t).

`quantize_per_token_residual(x, residual, bits, ...)` runs a residual step first (`fused_producers.Residual`):
s = x + gate·y in x's dtype, returned as the new residual stream, and the codes of producer(u) as above, from one
pass of the kernel, with u = s, or u = s + table[(m // rows_per_frame) % T] (rounded to x's dtype) when the
residual carries a per-frame table (the reference: the eager `x + gate * y`, the eager table add
`Residual.add_table`, then `quantize_per_token_reference` of u).
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.fused_producers import (NO_RESIDUAL, NONE, GeluTanh, LayerNormModulate, Residual, hardware_tanh,
                                          producer_args)

MIN_DELTA = 1e-6  # the activation quantizers' per-row floor on Δ


class ActCodes(NamedTuple):
    """A quantized activation matrix.

    codes [M, K] int8 · scale Δ [M] float32 · zero z_c [M] int32 · rowsum [M] int32 ·
    proj [M, r] float32 or None (TQE post term projection, frame factor applied).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    rowsum: torch.Tensor
    proj: torch.Tensor | None


def grid(bits: int, symmetric: bool) -> tuple[int, int, int]:
    """(q_min, q_max, code offset) of a `bits` activation grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits: expected 2..8, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 0
    return 0, 2**bits - 1, 2 ** (bits - 1)


def smooth_input(x: torch.Tensor, smooth_scale: torch.Tensor | None) -> torch.Tensor:
    """x / s in x's dtype, as `QuantLinear` balances its input. x [..., K], s [K] -> [..., K]."""
    return x if smooth_scale is None else x / smooth_scale.to(x.dtype)


def quantize_per_token_reference(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    smooth_scale: torch.Tensor | None = None,
    static: tuple[float, float] | None = None,
    post_a: torch.Tensor | None = None,
    frame_factor: torch.Tensor | None = None,
    producer: LayerNormModulate | GeluTanh | None = None,
) -> ActCodes:
    """The pure-PyTorch definition. x [M, K] (float dtypes) -> ActCodes (see the module docstring).

    smooth_scale: s [K] or None. static: (Δ, z) of a static per-tensor quantizer, or None (dynamic).
    post_a: A_out [r, K] or None. frame_factor: [T] float32 or None (row m uses frame_factor[m mod T]).
    producer: quantize producer.apply(x) instead of x (the model's eager ops), or None.
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: expected x [M, K], got {tuple(x.shape)}")
    q_min, q_max, offset = grid(bits, symmetric)
    if producer is not None:
        x = producer.apply(x)
    x32 = smooth_input(x, smooth_scale).float()
    if static is not None:
        delta = torch.full((x.shape[0], 1), float(static[0]), dtype=torch.float32, device=x.device)
        zero = torch.full_like(delta, float(static[1]))
    else:
        delta, zero = dynamic_token_range(x32, q_max, symmetric)
    q = torch.clamp(torch.round(x32 / delta) + zero, q_min, q_max)
    codes = (q - offset).to(torch.int8)
    zero_code = (zero - offset).to(torch.int32)
    act = ActCodes(codes, delta[:, 0].contiguous(), zero_code[:, 0].contiguous(), codes.sum(dim=1, dtype=torch.int32), None)
    if post_a is None or post_a.shape[0] == 0:
        return act
    return act._replace(proj=project_codes_reference(act, post_a, frame_factor))


def dynamic_token_range(x32: torch.Tensor, q_max: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max range of x32 [M, K] float32 (clamped to include 0) -> (Δ, z) float32 [M, 1] each, z on the
    unsigned grid (0 when symmetric). Plain torch ops, shared by the eager reference and the compiled path."""
    lo = x32.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = x32.amax(dim=-1, keepdim=True).clamp(min=0.0)
    if symmetric:
        delta = (torch.maximum(-lo, hi) / q_max).clamp(min=MIN_DELTA)
        return delta, torch.zeros_like(delta)
    delta = ((hi - lo) / q_max).clamp(min=MIN_DELTA)
    return delta, torch.round(-lo / delta)


def quantize_per_token_torch(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    smooth_scale: torch.Tensor | None = None,
    static: torch.Tensor | tuple[float, float] | None = None,
    post_a: torch.Tensor | None = None,
    frame_factor: torch.Tensor | None = None,
    rowsum: bool = True,
) -> ActCodes:
    """The compiled path's quantizer: `quantize_per_token_reference` (no producer) in plain torch ops that inductor
    fuses into the op producing x (LayerNorm + modulate, GELU, a layout copy) and into each other.

    Same grid, same float32 operations in the same order, so the codes, Δ and z equal the reference's (and x̂ equals
    `DynamicActQuantizer`'s) bit for bit wherever the compiler keeps IEEE division; on CUDA, inductor's default
    division is approximate unless `eager_numerics.division_rounding` is on (`qdiff.api.compile_model(exact=True)`).
    Differences from the reference, none in value: static may be a float32 tensor [2] = (Δ, z) (no host sync, no
    recompile per layer); the TQE projection of rank r ≤ 8 is an elementwise product summed over K (a reduction the
    compiler fuses, instead of a GEMM over a materialised x̂; equal up to summation order); the frame factor
    multiplies [M/T, T, r] (row m -> frame m mod T, as the reference indexes it); rowsum=False returns zeros [M]
    instead of the code row sums (a layer with symmetric weights never reads them).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: expected x [M, K], got {tuple(x.shape)}")
    q_min, q_max, offset = grid(bits, symmetric)
    x32 = smooth_input(x, smooth_scale).float()
    if static is not None:
        if isinstance(static, torch.Tensor):
            delta, zero = static[0:1].float()[:, None], static[1:2].float()[:, None]  # [1, 1] each, broadcast
        else:
            delta = torch.full((1, 1), float(static[0]), dtype=torch.float32, device=x.device)
            zero = torch.full_like(delta, float(static[1]))
    else:
        delta, zero = dynamic_token_range(x32, q_max, symmetric)
    q = torch.clamp(torch.round(x32 / delta) + zero, q_min, q_max)
    codes = (q - offset).to(torch.int8)
    rows = x.shape[0]
    scale = delta.expand(rows, 1)[:, 0].contiguous()
    zero_code = (zero - offset).to(torch.int32).expand(rows, 1)[:, 0].contiguous()
    sums = codes.sum(dim=1, dtype=torch.int32) if rowsum else torch.zeros_like(zero_code)
    proj = None
    if post_a is not None and post_a.shape[0] > 0:
        dequant = (q - zero) * delta  # x̂ [M, K] = (c − z_c)·Δ, as project_codes_reference forms it
        if post_a.shape[0] <= 8:
            proj = (dequant[:, None, :] * post_a.float()[None]).sum(dim=-1)  # [M, r]
        else:
            proj = dequant @ post_a.float().t()
        if frame_factor is not None:
            frames = frame_factor.shape[0]
            factor = frame_factor.float().reshape(1, frames, 1)
            proj = (proj.reshape(-1, frames, proj.shape[1]) * factor).reshape(proj.shape)
    return ActCodes(codes, scale, zero_code, sums, proj)


def project_codes_reference(act: ActCodes, post_a: torch.Tensor, frame_factor: torch.Tensor | None = None) -> torch.Tensor:
    """TQE projection from existing codes: proj[m, j] = f_m · Σ_k (c[m, k] − z_c[m])·Δ[m]·A_out[j, k] -> [M, r] f32.

    The same values as the `proj` that `quantize_per_token` computes in its pass (up to summation order); used
    when several layers share one quantized input (each has its own A_out).
    """
    dequant = (act.codes.float() - act.zero.float()[:, None]) * act.scale[:, None]  # x̂ [M, K]
    proj = dequant @ post_a.float().t()
    if frame_factor is not None:
        rows = torch.arange(act.codes.shape[0], device=proj.device) % frame_factor.shape[0]
        proj = proj * frame_factor.float()[rows][:, None]
    return proj


# ------------------------------------------------------------------------------------------ Triton
def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_triton_kernels(name: str):
    """The Triton kernel module `qdiff.kernels.<name>`, imported on first use; refuses one built for the other
    Triton mode (its INTERPRETED flag against TRITON_INTERPRET now)."""
    module = importlib.import_module(f"qdiff.kernels.{name}")
    if module.INTERPRETED != interpret_mode():
        raise RuntimeError("TRITON_INTERPRET changed after the Triton kernels were built; set it before first use")
    return module


def triton_usable(name: str, device: torch.device | str, interpreted: bool = True) -> bool:
    """True when the kernels of `qdiff.kernels.<name>` can run on tensors of `device`: CUDA with an importable
    Triton, or (`interpreted`) any device under TRITON_INTERPRET=1."""
    device = torch.device(device)
    if not (interpreted and interpret_mode()) and (device.type != "cuda" or not torch.cuda.is_available()):
        return False
    try:
        load_triton_kernels(name)
    except Exception:  # no triton, or one that cannot build here
        return False
    return True


def _triton_module():
    return load_triton_kernels("triton_act_quant")


def kernel_inputs(x: torch.Tensor, smooth_scale: torch.Tensor | None, producer, caller: str) -> tuple:
    """Check and lay out what the quantization kernels read: (x [M, K] with unit column stride, s [K] in x's dtype
    or None, shift, mscale [B, K] with unit column stride and one row stride (x itself, an unused pointer, without
    LayerNorm + modulate), rows_per_sample, eps). Row-strided shift and scale (chunks of STDiT's [B, 6, K] modulation)
    are read in place: a copy of each would be a kernel launch of its own."""
    if x.dim() != 2:
        raise ValueError(f"{caller}: expected x [M, K], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{caller}: unsupported dtype {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    smooth = None
    if smooth_scale is not None:
        if smooth_scale.shape != (cols,):
            raise ValueError(f"smooth_scale: expected [{cols}], got {tuple(smooth_scale.shape)}")
        smooth = smooth_scale.to(x.dtype).contiguous()
    if not isinstance(producer, LayerNormModulate):
        return x, smooth, x, x, 1, 0.0
    batch = producer.shift.shape[0]
    for name, tensor in (("shift", producer.shift), ("scale", producer.scale)):
        if tensor.shape != (batch, cols) or tensor.dtype != x.dtype:
            raise ValueError(f"{name}: expected {x.dtype} [B, {cols}], got {tensor.dtype} {tuple(tensor.shape)}")
    if batch * producer.rows_per_sample != rows:
        raise ValueError(f"LayerNormModulate: {batch} samples x {producer.rows_per_sample} rows != M = {rows}")
    shift, mscale = producer.shift, producer.scale
    if shift.stride(1) != 1 or mscale.stride(1) != 1 or shift.stride(0) != mscale.stride(0):  # the kernels' layout
        shift, mscale = shift.contiguous(), mscale.contiguous()
    return x, smooth, shift, mscale, producer.rows_per_sample, float(producer.eps)


def residual_inputs(x: torch.Tensor, residual: Residual | None, caller: str) -> tuple:
    """Check and lay out the residual step's inputs for x [M, K] (as `kernel_inputs` returns it): (y [M, K] with
    unit column stride, gate [B, K] with unit column stride (rows read in place), s: the new residual stream [M, K]
    to write, gate rows_per_sample, gate row stride, RESIDUAL kind, table [T, K] contiguous, table rows_per_frame, T (0: no table)); without a
    residual (or gate, or table) x stands in for the unused pointers."""
    if residual is None:
        return x, x, x, 1, 0, NO_RESIDUAL, x, 1, 0
    rows, cols = x.shape
    y = residual.y
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"{caller}: residual y: expected {x.dtype} {tuple(x.shape)}, got {y.dtype} {tuple(y.shape)}")
    if y.stride(-1) != 1:
        y = y.contiguous()
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    table, frames = residual.table, 0
    if table is not None:
        frames = table.shape[0]
        if table.shape != (frames, cols) or table.dtype != x.dtype or frames == 0:
            raise ValueError(f"{caller}: table: expected {x.dtype} [T, {cols}], got {table.dtype} {tuple(table.shape)}")
        if rows % (frames * residual.rows_per_frame):
            raise ValueError(f"Residual: M = {rows} is not a multiple of {frames} frames x {residual.rows_per_frame} "
                             "rows")
        table = table.contiguous()
    table_args = (x if table is None else table, residual.rows_per_frame, frames)
    gate = residual.gate
    if gate is None:
        return y, x, out, 1, 0, residual.kind, *table_args
    batch = gate.shape[0]
    if gate.shape != (batch, cols) or gate.dtype != x.dtype:
        raise ValueError(f"{caller}: gate: expected {x.dtype} [B, {cols}], got {gate.dtype} {tuple(gate.shape)}")
    if batch * residual.rows_per_sample != rows:
        raise ValueError(f"Residual: {batch} samples x {residual.rows_per_sample} rows != M = {rows}")
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    return y, gate, out, residual.rows_per_sample, gate.stride(0), residual.kind, *table_args


def quantize_per_token_triton(
    x: torch.Tensor,
    bits: int,
    symmetric: bool = False,
    smooth_scale: torch.Tensor | None = None,
    static: tuple[float, float] | None = None,
    post_a: torch.Tensor | None = None,
    frame_factor: torch.Tensor | None = None,
    producer: LayerNormModulate | GeluTanh | None = None,
    config: tuple[int, int, int] | None = None,
    fast: bool = False,
    residual: Residual | None = None,
) -> ActCodes | tuple[ActCodes, torch.Tensor]:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference.
    With a residual step: (ActCodes of producer(u), s [M, K]) as `quantize_per_token_residual_reference`.

    config: (ROWS, BLOCK_K, num_warps) to skip autotuning (the interpreter always needs one).
    fast: the GPU's approximate float32 division (x·(1/Δ) per row, GELU and smoothing with `/`) instead of IEEE
    division, and on NVIDIA GPUs GELU's tanh from `tanh.approx.f32` (`fused_producers.hardware_tanh`): fewer
    instructions per element, but a code may differ from the reference's by one step where x/Δ lies within an ulp
    of a rounding tie (the compiled torch path has the same property, see `quantize_per_token_torch`). Under the
    interpreter both are exact.
    """
    import triton

    x, smooth, shift, mscale, rows_per_sample, eps = kernel_inputs(x, smooth_scale, producer, "quantize_per_token")
    y, gate, out, gate_rows_per_sample, stride_gate, residual_kind, table, rows_per_frame, frames_in_table = \
        residual_inputs(x, residual, "quantize_per_token")
    q_min, q_max, offset = grid(bits, symmetric)
    rows, cols = x.shape
    device = x.device
    codes = torch.empty(rows, cols, dtype=torch.int8, device=device)
    scale = torch.empty(rows, dtype=torch.float32, device=device)
    zero = torch.empty(rows, dtype=torch.int32, device=device)
    rowsum = torch.empty(rows, dtype=torch.int32, device=device)
    rank = 0 if post_a is None else post_a.shape[0]
    if rank and post_a.shape[1] != cols:
        raise ValueError(f"post_a: expected [r, {cols}], got {tuple(post_a.shape)}")
    kernel_rank = 1 if rank == 1 else 0  # the kernel projects rank 1 in its pass; higher ranks follow from the codes
    if kernel_rank:
        post_a = post_a.float().contiguous()
        proj = torch.empty(rows, 1, dtype=torch.float32, device=device)
    else:
        proj = scale  # unused pointers
    frames = None if frame_factor is None else frame_factor.float().contiguous()
    if rows == 0:
        act = ActCodes(codes, scale, zero, rowsum, torch.empty(0, rank, device=device) if rank else None)
        return act if residual is None else (act, out)
    args = (x, smooth if smooth is not None else x, shift, mscale, codes, scale, zero, rowsum,
            post_a if kernel_rank else scale, proj,
            frames if frames is not None else scale, y, gate, out, table, rows, cols, x.stride(0), codes.stride(0),
            rows_per_sample, shift.stride(0), 0 if frames is None else frames.shape[0],
            float(static[0]) if static else 0.0, float(static[1]) if static else 0.0,
            float(q_min), float(q_max), float(offset), MIN_DELTA, eps, y.stride(0), out.stride(0),
            gate_rows_per_sample, stride_gate, rows_per_frame, frames_in_table)
    flags = dict(SMOOTH=smooth is not None, STATIC=static is not None, SYMMETRIC=symmetric, R_OUT=kernel_rank,
                 FRAMES=frames is not None and kernel_rank > 0,
                 PRODUCER=NONE if producer is None else producer.kind, FAST=bool(fast), RESIDUAL=residual_kind,
                 TABLE=frames_in_table > 0, HW_TANH=hardware_tanh(x.device, fast))
    # LayerNorm + modulate, and the residual step: no fma contraction. With it, LLVM fuses the modulation's bf16
    # multiply and add into one fma.rn.bf16 on sm_90, skipping the eager rounding of the product: 15-19% of the codes
    # moved on an H100 (the gate's product and the residual sum likewise)
    flags["enable_fp_fusion"] = not (isinstance(producer, LayerNormModulate) or residual is not None)
    kernels = _triton_module()
    if config is None and not interpret_mode():
        kernels.act_quant_tuned[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](*args, **flags)
    else:
        block_rows, block_k, warps = config or (16, 64, 4)
        kernels.act_quant_kernel[(triton.cdiv(rows, block_rows),)](*args, **flags, ONE_CHUNK=cols <= block_k,
                                                                    ROWS=block_rows, BLOCK_K=block_k, num_warps=warps)
    act = ActCodes(codes, scale, zero, rowsum, proj if kernel_rank else None)
    if rank > 1:
        act = act._replace(proj=project_codes_reference(act, post_a, frame_factor))
    return act if residual is None else (act, out)


def project_codes_triton(act: ActCodes, post_a: torch.Tensor, frame_factor: torch.Tensor | None = None,
                         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The Triton kernel of `project_codes_reference` (reads the int8 codes once). config: (ROWS, BLOCK_K, warps)."""
    import triton

    codes = act.codes
    rows, cols = codes.shape
    rank = post_a.shape[0]
    if post_a.shape != (rank, cols) or rank == 0:
        raise ValueError(f"post_a: expected [r >= 1, {cols}], got {tuple(post_a.shape)}")
    if rank > 1:  # the kernel projects rank 1
        return project_codes_reference(act, post_a, frame_factor)
    post_a = post_a.float().contiguous()
    proj = torch.empty(rows, rank, dtype=torch.float32, device=codes.device)
    if rows == 0:
        return proj
    frames = None if frame_factor is None else frame_factor.float().contiguous()
    args = (codes, act.scale, act.zero, post_a, proj, frames if frames is not None else act.scale, rows, cols,
            codes.stride(0), 0 if frames is None else frames.shape[0])
    flags = dict(FRAMES=frames is not None)
    kernels = _triton_module()
    if config is None and not interpret_mode():
        kernels.codes_projection_tuned[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](*args, **flags)
    else:
        block_rows, block_k, warps = config or (16, 64, 4)
        kernels.codes_projection_kernel[(triton.cdiv(rows, block_rows),)](*args, **flags, ROWS=block_rows,
                                                                          BLOCK_K=block_k, num_warps=warps)
    return proj


def project_codes(act: ActCodes, post_a: torch.Tensor, frame_factor: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Dispatch of the TQE projection from codes: Triton on CUDA (backend 'auto'/'triton'), else the reference."""
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.project_codes_op(act.codes, act.scale, act.zero, post_a, frame_factor, backend)
    use_triton = backend == "triton" or (backend == "auto" and act.codes.is_cuda and triton_available(act.codes.device))
    return (project_codes_triton if use_triton else project_codes_reference)(act, post_a, frame_factor)


def triton_available(device: torch.device | str = "cuda") -> bool:
    """True when the Triton kernels can run on `device` (CUDA with an importable Triton)."""
    return triton_usable("triton_act_quant", device, interpreted=False)


def quantize_per_token(x: torch.Tensor, bits: int, symmetric: bool = False, smooth_scale=None, static=None,
                       post_a=None, frame_factor=None, producer=None, backend: str = "auto",
                       fast: bool = False) -> ActCodes:
    """Dispatch: the Triton kernel on CUDA (backend 'auto' or 'triton'), the reference otherwise.

    fast: the Triton kernel's approximate division (see `quantize_per_token_triton`); the reference is exact."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _compiled_quantize_per_token(x, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer,
                                            backend, fast)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton_available(x.device))
    if use_triton:
        return quantize_per_token_triton(x, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer,
                                         fast=fast)
    return quantize_per_token_reference(x, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer)


def _compiled_quantize_per_token(x, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer,
                                 backend, fast) -> ActCodes:
    """`quantize_per_token` as the custom op `torch.ops.qdiff.quantize_per_token` (what torch.compile records)."""
    kind, shift, mscale, rows_per_sample, eps = producer_args(producer)
    static_delta, static_zero = (float(static[0]), float(static[1])) if static is not None else (_ops.NO_STATIC, 0.0)
    codes, scale, zero, rowsum, proj = _ops.quantize_per_token_op(
        x, bits, symmetric, smooth_scale, static_delta, static_zero, post_a, frame_factor, kind, shift, mscale,
        rows_per_sample, eps, backend, fast)
    return ActCodes(codes, scale, zero, rowsum, proj if post_a is not None and post_a.shape[0] else None)


def quantize_per_token_residual_reference(x: torch.Tensor, residual: Residual, bits: int, symmetric: bool = False,
                                          smooth_scale=None, static=None, post_a=None, frame_factor=None,
                                          producer=None) -> tuple[ActCodes, torch.Tensor]:
    """s = residual.apply(x) (the eager `x + gate * y`), then `quantize_per_token_reference` of u =
    residual.add_table(s) (s itself without a table): (ActCodes of u, s)."""
    s = residual.apply(x)
    u = residual.add_table(s)
    return quantize_per_token_reference(u, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer), s


def quantize_per_token_residual(x: torch.Tensor, residual: Residual, bits: int, symmetric: bool = False,
                                smooth_scale=None, static=None, post_a=None, frame_factor=None, producer=None,
                                backend: str = "auto", fast: bool = False) -> tuple[ActCodes, torch.Tensor]:
    """x [M, K] -> (ActCodes of producer(u), s [M, K] in x's dtype) with s = x + gate·y and u = s (+ the residual's
    per-frame table) (`Residual`): the residual step and the quantization in one kernel pass that writes s once;
    dispatch as `quantize_per_token`."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        kind, shift, mscale, rows_per_sample, eps = producer_args(producer)
        static_delta, static_zero = ((float(static[0]), float(static[1])) if static is not None
                                     else (_ops.NO_STATIC, 0.0))
        codes, scale, zero, rowsum, proj, s = _ops.quantize_per_token_residual_op(
            x, residual.y, residual.gate, residual.rows_per_sample, residual.table, residual.rows_per_frame, bits,
            symmetric, smooth_scale, static_delta, static_zero, post_a, frame_factor, kind, shift, mscale,
            rows_per_sample, eps, backend, fast)
        return ActCodes(codes, scale, zero, rowsum, proj if post_a is not None and post_a.shape[0] else None), s
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton_available(x.device))
    if use_triton:
        return quantize_per_token_triton(x, bits, symmetric, smooth_scale, static, post_a, frame_factor, producer,
                                         fast=fast, residual=residual)
    return quantize_per_token_residual_reference(x, residual, bits, symmetric, smooth_scale, static, post_a,
                                                  frame_factor, producer)
