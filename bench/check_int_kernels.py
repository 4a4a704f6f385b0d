"""Compile and run every Triton kernel variant of the integer path on the GPU, and compare each with its reference.

    python bench/check_int_kernels.py             # one line per variant: PASS/FAIL/SKIP, name, numbers or the error
    python bench/check_int_kernels.py --jobs 1    # in this process, one variant after another

Exit status 1 if any variant fails. The variants are the constexpr combinations that the W8A8, W4A8, W4A6 and W3A6
configs reach (Q-VDiT, ViDiT-Q, naive PTQ) and the fused producers (docs/int_kernels.md):
  act_*    per-token quantization: producer none / LayerNorm+modulate / GELU, SMOOTH, STATIC, SYMMETRIC,
           R_OUT 0, 1 or 3 (q/k/v stacked), FRAMES, input dtype, and a whole-row (ONE_CHUNK) and a chunked tile;
           shapes (M, K) = (300, 1152), (77, 4608), (5, 1168) with ragged M and K
  proj_*   the TQE projection from shared codes, with and without frame factors
  gemm_*   the int8 GEMM: W8 and W4 (nibble unpack; EVEN_K true and false), zero points on both / one / no side,
           bias, R_OUT 0 or 1, bf16, fp32 and int32 outputs; shapes (M, N, K) = (300, 1152, 1152),
           (77, 2304, 1152), (129, 1152, 4608), (33, 40, 72)
  tuned_*  the autotuned launches (every tile config of AUTOTUNE_CONFIGS compiles and runs)
  model_*  a tiny STDiT converted to IntLinear, Triton (fused producers on) vs the torch reference path, in float32
           (and in bf16 for W8A8)
  attn_short_*  the short-sequence (temporal) attention kernel (`qdiff.kernels.short_attention`): bf16, fp16, fp32,
           q, k, v as strided slices of one [B', N, 3C] tensor, (N, d) = (16, 72), (5, 64), (32, 16); every
           (problems, warps) config of its CONFIGS in bf16; output vs the float32 reference (max error ≤ 1e-5 of
           the output's max |value| in fp32, 3e-3 fp16, 2e-2 bf16: P is rounded to the input dtype)
  attn_cross_*  the cross-attention kernel (`qdiff.kernels.cross_attention`) at XL/2's shape: B = 2, N = 16384
           video tokens, 16 heads of 72, L = 120 text tokens with a key mask (120 and 37 valid), q a view of
           [B, N, 3C], k and v the halves of [B, L, 2C]; and a ragged unmasked one (N = 1000, L = 12); bf16 with
           every (BLOCK_M, warps) config of its CONFIGS, fp32 autotuned (its larger tiles exceed the shared memory
           in fp32 and are skipped); bounds as attn_short_*. attn_cross_fp8_*: the kernel with the e4m3
           quantization fused (`cross_attention_fp8_triton`, exact and fast division): codes and scales equal, bit
           for bit, the FP8 quantization kernel's on the kernel's own output
  fp8_*    per-token e4m3 quantization (`quantize_fp8_per_token_triton`, FP8Linear's input): producer none /
           LayerNorm+modulate / GELU, with and without smoothing, bf16 and fp32, exact and fast division, the two
           tiles and the whole rows read as a piece and a tail (FP8_TILES);
           tuned_fp8_* autotuned
  *_residual_*  act_ and fp8_ variants with the residual step in front (`fused_producers.Residual`: s = x + gate·y,
           gated or not, y row-strided), then no producer or LayerNorm+modulate: the written s must equal the eager
           `x + gate * y` bit for bit, codes and scales as for the variant without it; *_table_*: the codes of
           s + table[frame] (the temporal q/k/v input, `Residual.table`)
  compiled_*  torch.compile of the tiny STDiT (`compile_blocks`, fullgraph, inductor; aot_eager under the
           interpreter) vs the same model eager on the device: float (bf16), fake-quant W4A8, the IntLinear models
           (custom-op GEMM; activation quantization in plain torch, or the Triton kernel as a custom op) and the
           W8A8 FP8Linear model (int_act_quant "fused": its FP8 kernel with the producers)
Codes, scales, zero points, row sums and int32 GEMM results must be equal to the references (activation
references run on the CPU: CUDA's torch divides by a Python scalar through its reciprocal); so must the e4m3 codes
and scales without a producer in exact mode. Fused producers (LayerNorm moments, GELU) may round differently from
torch's kernels in the last bit, and fast mode divides approximately: a code (integer or e4m3) may move by one step
on at most 0.5% of the elements. Float outputs: relative L2 ≤ 1e-5 (fp32), 1e-2 (bf16); the tiny models: ≤ 1e-2 in
float32 (CPU and GPU float ops differ in the last bits, which moves a few codes) and < 0.25 in bf16 (a sanity bound).

Variants run in worker processes (--jobs, default 12): compilation dominates, and it is per process. Under 60 s on
an H100 host with 16 cores. Without CUDA, run it under TRITON_INTERPRET=1 on the CPU (smaller shapes, autotuned
variants skipped): that checks this script, not the GPU compiler.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_TILES = {"whole": (2, 8192, 8), "chunked": (16, 256, 4)}  # (ROWS, BLOCK_K, warps): both in AUTOTUNE_CONFIGS
GEMM_TILE = (128, 128, 64, 5, 4)  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): W4 K=1152 has EVEN_K false with 128
ACT_SHAPES = ((300, 1152), (77, 4608), (5, 1168))
CROSS_SHAPES = ((2, 16384, 120, 16, 72, (120, 37)), (3, 1000, 12, 2, 72, None))  # (B, N, L, heads, d, valid keys)
GEMM_SHAPES = ((300, 1152, 1152), (77, 2304, 1152), (129, 1152, 4608), (33, 40, 72))
# the FP8 kernel's whole rows read as a power-of-two piece and a tail (K = 1152 and 1168 with 1024 lanes, K = 4608
# with 4096), both in its FP8_AUTOTUNE_CONFIGS
FP8_TILES = {**ACT_TILES, "split1024": (4, 1024, 4), "split4096": (2, 4096, 8)}
if INTERPRET:  # the interpreter runs numpy per program: small problems, small tiles
    ACT_TILES = {"whole": (4, 256, 4), "chunked": (8, 64, 4)}
    FP8_TILES = {**ACT_TILES, "split": (4, 128, 4)}  # K = 160 as 128 + 32
    GEMM_TILE = (32, 32, 32, 1, 4)
    ACT_SHAPES = ((38, 160), (5, 200))
    GEMM_SHAPES = ((37, 48, 96), (19, 40, 66))
    CROSS_SHAPES = ((2, 300, 120, 2, 72, (120, 37)), (3, 100, 12, 2, 72, None))

# (name, producer, smooth, static, symmetric, r_out, frames, dtypes): what the configs reach
ACT_VARIANTS = (
    ("memo_codes", "none", False, False, False, 0, False, ("bfloat16", "float32")),  # shared q/k/v codes, no smoothing
    ("smooth_tqe", "none", True, False, False, 1, False, ("bfloat16", "float32")),  # W4A8 Q-VDiT, plain layers
    ("smooth_tqe_frames", "none", True, False, False, 1, True, ("bfloat16", "float32")),  # W4A8 temporal layers
    ("rotated_tqe_frames", "none", False, False, False, 1, True, ("bfloat16",)),  # smooth + rotate with TQE
    ("static", "none", False, True, False, 0, False, ("bfloat16", "float32")),  # naive PTQ
    ("symmetric", "none", False, False, True, 0, False, ("bfloat16", "float16")),
    ("ln_qkv_tqe3", "layernorm_modulate", False, False, False, 3, False, ("bfloat16", "float32")),  # q, k, v stacked
    ("ln_tqe", "layernorm_modulate", False, False, False, 1, False, ("bfloat16", "float32")),  # fc1
    ("ln_smooth_tqe", "layernorm_modulate", True, False, False, 1, False, ("bfloat16", "float32")),
    ("ln_plain", "layernorm_modulate", False, False, False, 0, False, ("bfloat16",)),
    ("ln_static", "layernorm_modulate", False, True, False, 0, False, ("bfloat16", "float32")),
    ("gelu_tqe", "gelu_tanh", False, False, False, 1, False, ("bfloat16", "float32")),  # fc2
    ("gelu_smooth_tqe", "gelu_tanh", True, False, False, 1, False, ("bfloat16", "float32")),
    ("gelu_plain", "gelu_tanh", False, False, False, 0, False, ("bfloat16",)),
    ("gelu_static", "gelu_tanh", False, True, False, 0, False, ("bfloat16", "float32")),
)
# (producer, smooth) of FP8Linear's inputs: W8A8 FP8 (no smoothing) and W4A8 FP8 (smoothing)
FP8_VARIANTS = (("none", False), ("none", True), ("layernorm_modulate", False), ("layernorm_modulate", True),
                ("gelu_tanh", False), ("gelu_tanh", True))
# (name, w4, a_zero, w_zero, bias, r_out, out): what the configs reach, and the exact int32 output
GEMM_VARIANTS = (
    ("asym_tqe_bf16", False, True, True, True, 1, "bfloat16"),  # Q-VDiT, bf16 model
    ("asym_tqe_fp32", False, True, True, True, 1, "float32"),  # Q-VDiT, float32 numerics
    ("asym_bf16", False, True, True, True, 0, "bfloat16"),  # ViDiT-Q / PTQ (no TQE)
    ("asym_fp32", False, True, True, True, 0, "float32"),
    ("sym_w_bf16", False, True, False, True, 0, "bfloat16"),
    ("sym_both_bf16", False, False, False, False, 0, "bfloat16"),
    ("int32", False, True, True, False, 0, "int32"),
)


# ------------------------------------------------------------------------------------------------ variants
def variants() -> list[tuple]:
    """(name, kind, params) of every check, the slow ones (autotuning, models) first."""
    out = []
    for yaml in ("w8a8_qvdit", "w4a8_qvdit", "w4a6_qvdit", "w3a6_viditq", "w8a8_ptq"):
        out.append((f"model_{yaml}", "model", dict(yaml=yaml, bf16=yaml == "w8a8_qvdit")))
    for yaml, act_quant in (("w8a8_qvdit", "torch"), ("w4a8_qvdit", "torch"), ("w8a8_ptq", "torch"),
                            ("w4a8_qvdit", "kernel")):
        out.append((f"compiled_int_{yaml}_{act_quant}", "compiled", dict(kind="int", yaml=yaml, act_quant=act_quant)))
    out.append(("compiled_fakequant_w4a8_qvdit", "compiled", dict(kind="fake", yaml="w4a8_qvdit", act_quant="torch")))
    out.append(("compiled_fp8_w8a8_fp8_fused", "compiled", dict(kind="int", yaml="w8a8_fp8", act_quant="fused")))
    out.append(("compiled_bf16", "compiled", dict(kind="float", yaml=None, act_quant="torch")))
    for w4 in (False, True):
        out.append((f"tuned_gemm_{'w4' if w4 else 'w8'}", "tuned_gemm", dict(w4=w4)))
    out.append(("tuned_act_ln_qkv_tqe3_bfloat16", "tuned_act", dict(producer="layernorm_modulate", r_out=3)))
    out.append(("tuned_act_gelu_tqe_bfloat16", "tuned_act", dict(producer="gelu_tanh", r_out=1)))
    out.append(("tuned_proj_r1_frames", "tuned_proj", {}))
    for producer in ("layernorm_modulate", "gelu_tanh"):
        out.append((f"tuned_fp8_{producer}_bfloat16_fast", "tuned_fp8", dict(producer=producer, fast=True)))
    for name, producer, smooth, static, symmetric, r_out, frames, dtypes in ACT_VARIANTS:
        for dtype in dtypes:
            for tile in ACT_TILES:
                out.append((f"act_{name}_{dtype}_{tile}", "act",
                            dict(producer=producer, smooth=smooth, static=static, symmetric=symmetric, r_out=r_out,
                                 frames=frames, dtype=dtype, tile=tile)))
                if producer == "gelu_tanh" and dtype == "bfloat16" and not static:  # fast: the hardware tanh (CUDA)
                    out.append((f"act_{name}_{dtype}_fast_{tile}", "act",
                                dict(producer=producer, smooth=smooth, static=static, symmetric=symmetric,
                                     r_out=r_out, frames=frames, dtype=dtype, tile=tile, fast=True)))
    for producer, smooth in FP8_VARIANTS:
        for dtype, fast in (("bfloat16", False), ("float32", False), ("bfloat16", True)):
            for tile in FP8_TILES:
                out.append((f"fp8_{producer}{'_smooth' if smooth else ''}_{dtype}{'_fast' if fast else ''}_{tile}",
                            "fp8", dict(producer=producer, smooth=smooth, dtype=dtype, fast=fast, tile=tile)))
    for producer in ("none", "layernorm_modulate"):
        for gated in (True, False):
            for tile in FP8_TILES:
                name = f"{producer}_residual{'_gated' if gated else ''}_bfloat16_{tile}"
                out.append((f"fp8_{name}", "fp8", dict(producer=producer, smooth=False, dtype="bfloat16", fast=False,
                                                       tile=tile, residual=gated)))
                if tile in ACT_TILES:
                    out.append((f"act_{name}", "act", dict(producer=producer, r_out=1, dtype="bfloat16", tile=tile,
                                                           residual=gated)))
    for tile in FP8_TILES:  # the temporal q/k/v input: spatial residual step plus the temporal table
        name = f"none_residual_gated_table_bfloat16_{tile}"
        out.append((f"fp8_{name}", "fp8", dict(producer="none", smooth=False, dtype="bfloat16", fast=False, tile=tile,
                                               residual=True, table=True)))
        if tile in ACT_TILES:
            out.append((f"act_{name}", "act", dict(producer="none", r_out=1, dtype="bfloat16", tile=tile,
                                                   residual=True, table=True)))
    for frames in (False, True):
        out.append((f"proj_r1{'_frames' if frames else ''}", "proj", dict(frames=frames)))
    from qdiff.kernels.short_attention import CONFIGS as ATTENTION_CONFIGS, DEFAULT_CONFIG as DEFAULT_ATTENTION_CONFIG

    for dtype in ("bfloat16", "float16", "float32"):
        for config in ATTENTION_CONFIGS if dtype == "bfloat16" else (DEFAULT_ATTENTION_CONFIG,):
            out.append((f"attn_short_{dtype}_{config[0]}x{config[1]}", "attn", dict(dtype=dtype, config=config)))
    from qdiff.kernels.cross_attention import CONFIGS as CROSS_CONFIGS

    for dtype in ("bfloat16", "float32"):
        for config in CROSS_CONFIGS if dtype == "bfloat16" else (None,):
            name = "autotuned" if config is None else f"{config[0]}x{config[1]}"
            out.append((f"attn_cross_{dtype}_{name}", "cross", dict(dtype=dtype, config=config)))
    for fast in (False, True):
        for dtype in ("bfloat16", "float32"):
            out.append((f"attn_cross_fp8_{dtype}{'_fast' if fast else ''}", "cross_fp8", dict(dtype=dtype, fast=fast)))
    for name, _, a_zero, w_zero, bias, r_out, dtype in GEMM_VARIANTS:
        for w4 in (False, True):
            out.append((f"gemm_{'w4' if w4 else 'w8'}_{name}", "gemm",
                        dict(w4=w4, a_zero=a_zero, w_zero=w_zero, bias=bias, r_out=r_out, out=dtype)))
    return out


# ------------------------------------------------------------------------------------------------ checks
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu(value):
    """Tensors (or tuples/named tuples of them) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple) and hasattr(value, "_replace"):
        return type(value)(*(_cpu(v) for v in value))
    return value


def _producer(kind: str, rows: int, cols: int, dtype, device, gen):
    from qdiff.kernels.fused_producers import GeluTanh, LayerNormModulate

    if kind == "none":
        return None
    if kind == "gelu_tanh":
        return GeluTanh()
    batch = 2 if rows % 2 == 0 else 1
    shift = torch.randn(batch, cols, generator=gen).to(device, dtype)
    scale = (torch.randn(batch, cols, generator=gen) * 0.3).to(device, dtype)
    return LayerNormModulate(shift, scale, rows // batch, 1e-6)


def _residual(rows: int, cols: int, dtype, gen, gated: bool, table: bool = False):
    """A Residual (CPU) for x [rows, cols]: y a row-strided view, gate [B, K] or None; with `table` a per-frame table
    [T, K] (the temporal position table the temporal q/k/v read), T dividing each sample's rows."""
    from qdiff.kernels.fused_producers import Residual

    batch = 2 if rows % 2 == 0 else 1
    y = (torch.randn(rows, cols + 8, generator=gen) * 3).to(dtype)[:, 4:cols + 4]
    gate = (torch.randn(batch, cols, generator=gen) * 0.7).to(dtype) if gated else None
    if not table:
        return Residual(y, gate, rows // batch)
    per_sample = rows // batch
    frames = next(d for d in (5, 7, 4, 19, 1) if per_sample % d == 0)
    frame_table = (torch.randn(frames, cols, generator=gen) * 0.5).to(dtype)
    return Residual(y, gate, per_sample, frame_table, per_sample // frames)


def _quantizer_input(x, residual):
    """What the kernel quantizes (before its producer): x, or the residual step's s plus the table (eager ops)."""
    return x if residual is None else residual.add_table(residual.apply(x))


def _residual_on(residual, device):
    return None if residual is None else type(residual)(*(v.to(device) if isinstance(v, torch.Tensor) else v
                                                          for v in residual))


def _compare_residual(s, x, residual) -> None:
    """The kernel's s equals the eager `x + gate * y` (CPU) bit for bit."""
    assert torch.equal(s.cpu(), residual.apply(x)), "the written residual stream differs"


def _compare_codes(kernel, reference, exact: bool, post_a=None, frame_factor=None) -> str:
    """Raises AssertionError on a mismatch; returns the numbers for the report line. Not exact: codes may move by one
    step, and each moved code moves the TQE projection by f_m·Δ_m·|A_out[j, k]|: the projection of the moves with
    |A_out| bounds its difference (plus 1e-4 of its largest value)."""
    from qdiff.kernels.act_quant import project_codes_reference

    kernel = _cpu(kernel)
    diff = (kernel.codes.int() - reference.codes.int()).abs()
    moved = float((diff > 0).float().mean())
    if exact:
        for field in ("codes", "scale", "zero", "rowsum"):
            assert torch.equal(getattr(kernel, field), getattr(reference, field)), f"{field} differs"
    else:
        assert int(diff.max()) <= 1 and moved <= 5e-3, f"codes: max diff {int(diff.max())}, {moved:.2%} moved"
        torch.testing.assert_close(kernel.scale, reference.scale, rtol=1e-5, atol=0)
        assert int((kernel.zero - reference.zero).abs().max()) <= 1, "zero points differ by more than 1"
        assert ((kernel.rowsum - reference.rowsum).abs() <= diff.sum(1)).all(), "row sums differ"
    proj_err = 0.0
    if reference.proj is not None:
        largest = reference.proj.abs().max().clamp(min=1e-12)
        error = (kernel.proj - reference.proj).abs()
        slack = 0.0
        if not exact:
            moves = reference._replace(codes=diff, zero=torch.zeros_like(reference.zero))
            slack = project_codes_reference(moves, post_a.abs(), None if frame_factor is None else frame_factor.abs())
        proj_err = float(error.max() / largest)
        assert (error <= slack + 1e-4 * largest).all(), f"TQE projection rel err {proj_err:.2e} beyond the moves' bound"
    return f"codes moved {moved:.2e}, proj rel err {proj_err:.1e}"


def check_act(params: dict, tuned: bool = False) -> str:
    from qdiff.kernels.act_quant import quantize_per_token_reference, quantize_per_token_triton

    device, dtype = _device(), getattr(torch, params.get("dtype", "bfloat16"))
    gen = torch.Generator().manual_seed(0)
    lines = []
    shapes = ACT_SHAPES[:2] if tuned else ACT_SHAPES
    for (rows, cols), bits in zip(shapes, (8, 6, 8)):
        x = (torch.randn(rows, cols, generator=gen) * torch.linspace(0.1, 6, cols) + 0.2).to(dtype)
        x[0] = 0  # an all-zero token
        kwargs = {}
        if params.get("smooth"):
            kwargs["smooth_scale"] = torch.rand(cols, generator=gen) + 0.5
        if params.get("static"):
            kwargs["static"] = (0.05, 0.0 if params.get("symmetric") else 37.0)
        if params.get("r_out"):
            kwargs["post_a"] = torch.randn(params["r_out"], cols, generator=gen)
        if params.get("frames"):
            kwargs["frame_factor"] = torch.rand(16, generator=gen) + 0.5
        producer = _producer(params.get("producer", "none"), rows, cols, dtype, "cpu", gen)
        symmetric = params.get("symmetric", False)
        residual = (_residual(rows, cols, dtype, gen, params["residual"], params.get("table", False))
                    if "residual" in params else None)
        source = _quantizer_input(x, residual)  # the residual step (and table): the eager ops on the CPU
        reference = quantize_per_token_reference(source, bits, symmetric, **kwargs, producer=producer)
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if hasattr(producer, "shift"):  # LayerNormModulate: its tensors too
            producer = producer._replace(shift=producer.shift.to(device), scale=producer.scale.to(device))
        config = None if tuned else ACT_TILES[params["tile"]]
        kernel = quantize_per_token_triton(x.to(device), bits, symmetric, **on_device, producer=producer, config=config,
                                           residual=_residual_on(residual, device), fast=params.get("fast", False))
        if residual is not None:
            kernel, s = kernel
            _compare_residual(s, x, residual)
        exact = producer is None and not params.get("fast")
        lines.append(f"{rows}x{cols} A{bits}: " + _compare_codes(kernel, reference, exact, kwargs.get("post_a"),
                                                                 kwargs.get("frame_factor")))
    return "; ".join(lines)


def check_fp8(params: dict, tuned: bool = False) -> str:
    from qdiff.kernels.fp8_quant import e4m3_steps, quantize_fp8_per_token_reference, quantize_fp8_per_token_triton

    device, dtype = _device(), getattr(torch, params.get("dtype", "bfloat16"))
    gen = torch.Generator().manual_seed(3)
    exact = params["producer"] == "none" and not params["fast"]
    lines = []
    for rows, cols in ACT_SHAPES[:2] if tuned else ACT_SHAPES:
        x = (torch.randn(rows, cols, generator=gen) * torch.linspace(0.1, 6, cols) + 0.2).to(dtype)
        x[0] = 0  # an all-zero token
        smooth = torch.rand(cols, generator=gen) + 0.5 if params.get("smooth") else None
        producer = _producer(params["producer"], rows, cols, dtype, "cpu", gen)
        residual = (_residual(rows, cols, dtype, gen, params["residual"], params.get("table", False))
                    if "residual" in params else None)
        source = _quantizer_input(x, residual)  # the residual step (and table): the eager ops on the CPU
        codes_ref, scale_ref = quantize_fp8_per_token_reference(source, smooth, producer)  # CPU: IEEE division
        if hasattr(producer, "shift"):  # LayerNormModulate: its tensors too
            producer = producer._replace(shift=producer.shift.to(device), scale=producer.scale.to(device))
        result = quantize_fp8_per_token_triton(x.to(device), None if smooth is None else smooth.to(device),
                                               producer, config=None if tuned else FP8_TILES[params["tile"]],
                                               fast=params["fast"], residual=_residual_on(residual, device))
        if residual is not None:
            _compare_residual(result[2], x, residual)
        codes, scale = result[0].cpu(), result[1].cpu()
        steps = e4m3_steps(codes, codes_ref)
        moved = float((steps > 0).float().mean())
        if exact:
            assert torch.equal(codes.view(torch.uint8), codes_ref.view(torch.uint8)), f"codes: {moved:.2%} moved"
            assert torch.equal(scale, scale_ref), "scales differ"
        else:
            assert int(steps.max()) <= 1 and moved <= 5e-3, f"codes: max {int(steps.max())} steps, {moved:.2%} moved"
            torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
        lines.append(f"{rows}x{cols}: codes moved {moved:.2e}, scale rel err "
                     f"{float(((scale - scale_ref).abs() / scale_ref).max()):.1e}")
    return "; ".join(lines)


def check_proj(params: dict, tuned: bool = False) -> str:
    from qdiff.kernels.act_quant import project_codes_reference, project_codes_triton, quantize_per_token_reference

    device = _device()
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for rows, cols in ACT_SHAPES:
        act = quantize_per_token_reference(torch.randn(rows, cols, generator=gen) * 3, 8)
        post_a = torch.randn(1, cols, generator=gen)
        factor = torch.rand(16, generator=gen) + 0.5 if params.get("frames", True) else None
        reference = project_codes_reference(act, post_a, factor)
        act_dev = type(act)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in act))
        kernel = project_codes_triton(act_dev, post_a.to(device), None if factor is None else factor.to(device),
                                      config=None if tuned else ACT_TILES["chunked"]).cpu()
        worst = max(worst, float((kernel - reference).abs().max() / reference.abs().max()))
    assert worst < 1e-4, f"rel err {worst:.2e}"
    return f"max rel err {worst:.1e}"


def check_attn(params: dict) -> str:
    from qdiff.kernels.short_attention import short_attention_reference, short_attention_triton

    device, dtype = _device(), getattr(torch, params["dtype"])
    gen = torch.Generator().manual_seed(4)
    bound = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]  # of the max |output|
    lines = []
    for rows, seq, heads, head_dim in ((37, 16, 16, 72), (11, 5, 3, 64), (9, 32, 2, 16)):
        channels = heads * head_dim
        qkv = (torch.randn(rows, seq, 3 * channels, generator=gen) * 1.5).to(dtype)
        q, k, v = qkv.split(channels, dim=-1)
        reference = short_attention_reference(q, k, v, heads).float()  # float32 math on the CPU
        dev = qkv.to(device).split(channels, dim=-1)
        out = short_attention_triton(*dev, heads, config=params["config"])
        lines.append(_attention_error(out, reference, q, bound, f"N={seq} d={head_dim}"))
    return "max error / max |out|: " + ", ".join(lines)


def _attention_error(out, reference, q, bound: float, label: str) -> str:
    """'label: error' for an attention kernel's output: q's dtype and shape, max error ≤ bound · max |reference|."""
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, tuple(out.shape))
    error = float((out.cpu().float() - reference).abs().max() / reference.abs().max())
    assert error <= bound, f"{label}: max error {error:.2e} of max |out| (bound {bound})"
    return f"{label}: {error:.1e}"


def _cross_inputs(dtype, gen, device):
    """Per CROSS_SHAPES entry: ((q, k, v, mask) on the CPU, the same on `device`, heads); q a view of [B, N, 3C], k
    and v the halves of [B, L, 2C]."""
    for batch, queries, keys, heads, head_dim, valid in CROSS_SHAPES:
        channels = heads * head_dim
        qkv = (torch.randn(batch, queries, 3 * channels, generator=gen) * 1.5).to(dtype)
        kv = (torch.randn(batch, keys, 2 * channels, generator=gen) * 1.5).to(dtype)
        mask = None if valid is None else torch.arange(keys)[None] < torch.tensor(valid)[:, None]

        def views(qkv, kv, mask):
            return qkv[..., :channels], *kv.chunk(2, dim=-1), mask

        yield views(qkv, kv, mask), views(qkv.to(device), kv.to(device), None if mask is None else mask.to(device)), \
            heads


def check_cross_fp8(params: dict) -> str:
    from qdiff.kernels.cross_attention import cross_attention_fp8_triton, cross_attention_triton
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token

    device, dtype, fast = _device(), getattr(torch, params["dtype"]), params["fast"]
    lines = []
    for (q, k, _, _), on_device, heads in _cross_inputs(dtype, torch.Generator().manual_seed(6), device):
        args = (*on_device, heads)
        codes, scale = cross_attention_fp8_triton(*args, fast=fast)
        out = cross_attention_triton(*args)
        expected_codes, expected_scale = quantize_fp8_per_token(out.reshape(-1, out.shape[-1]), backend="triton",
                                                                fast=fast)
        assert torch.equal(scale, expected_scale), "scales differ"
        moved = int((codes.view(torch.uint8) != expected_codes.view(torch.uint8)).sum())
        assert moved == 0, f"{moved} codes differ from quantizing the kernel's output"
        lines.append(f"N={q.shape[1]} L={k.shape[1]}: {codes.numel()} codes equal")
    return ", ".join(lines)


def check_cross(params: dict) -> str:
    from qdiff.kernels.cross_attention import cross_attention_reference, cross_attention_triton

    device, dtype = _device(), getattr(torch, params["dtype"])
    bound = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]  # of the max |output|
    lines = []
    for (q, k, v, mask), on_device, heads in _cross_inputs(dtype, torch.Generator().manual_seed(5), device):
        queries, keys = q.shape[1], k.shape[1]
        reference = cross_attention_reference(q, k, v, mask, heads).float()  # float32 math on the CPU
        out = cross_attention_triton(*on_device, heads, config=params["config"])
        label = f"N={queries} L={keys}{'' if mask is None else ' masked'}"
        lines.append(_attention_error(out, reference, q, bound, label))
    return "max error / max |out|: " + ", ".join(lines)


def check_gemm(params: dict, tuned: bool = False) -> str:
    from qdiff.kernels.int_gemm import int_gemm_reference, int_gemm_triton
    from qdiff.lowbit.pack import pack_int4

    device = _device()
    gen = torch.Generator().manual_seed(2)
    w4 = params["w4"]
    low, high = (-8, 8) if w4 else (-128, 128)
    lines = []
    shapes = ((1024, 1152, 1152),) if tuned else GEMM_SHAPES  # M % 16 == 0: the binaries the benchmark reuses
    for rows, n_out, depth in shapes:
        a = torch.randint(-128, 128, (rows, depth), generator=gen, dtype=torch.int8)
        w = torch.randint(low, high, (n_out, depth), generator=gen, dtype=torch.int8)
        ops = dict(a_scale=torch.rand(rows, generator=gen) * 1e-2, w_scale=torch.rand(n_out, generator=gen) * 1e-2)
        if params.get("a_zero", True):
            ops["a_zero"] = torch.randint(-128, 128, (rows,), generator=gen, dtype=torch.int32)
            ops["w_colsum"] = w.sum(1, dtype=torch.int32)
        else:
            ops["a_zero"], ops["w_colsum"] = None, None
        if params.get("w_zero", True):
            ops["w_zero"] = torch.randint(low, high, (n_out,), generator=gen, dtype=torch.int32)
            ops["a_rowsum"] = a.sum(1, dtype=torch.int32)
        else:
            ops["w_zero"], ops["a_rowsum"] = None, None
        if params.get("bias", True):
            ops["bias"] = torch.randn(n_out, generator=gen)
        if params.get("r_out", 1):
            ops["proj"], ops["post_b"] = torch.randn(rows, 1, generator=gen), torch.randn(n_out, 1, generator=gen)
        ops = {k: None if v is None else v.to(device) for k, v in ops.items()}
        a, w = a.to(device), w.to(device)
        stored, k = (pack_int4(w), depth) if w4 else (w, None)
        out = params.get("out", "bfloat16")
        config = None if tuned else GEMM_TILE
        if out == "int32":
            kernel = int_gemm_triton(a, w=stored, out_int32=True, k=k, config=config, **ops)
            assert torch.equal(kernel, int_gemm_reference(a, w=w, out_int32=True, **ops)), "int32 accumulator differs"
            lines.append(f"{rows}x{n_out}x{depth}: exact")
            continue
        dtype = getattr(torch, out)
        exact = int_gemm_triton(a, w=stored, out_int32=True, k=k, config=config, **ops)
        assert torch.equal(exact, int_gemm_reference(a, w=w, out_int32=True, **ops)), "int32 accumulator differs"
        kernel = int_gemm_triton(a, w=stored, out_dtype=dtype, k=k, config=config, **ops).float()
        reference = int_gemm_reference(a, w=w, out_dtype=torch.float32, **ops)
        error = float((kernel - reference).norm() / reference.norm())
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), f"rel L2 {error:.2e}"
        lines.append(f"{rows}x{n_out}x{depth}: rel L2 {error:.1e}")
    return "; ".join(lines)


def _single_tile_autotuners() -> None:
    """Model checks: one tile config per kernel (the tuned_* variants cover autotuning)."""
    from qdiff.kernels import triton_act_quant, triton_fp8_act_quant, triton_int_gemm

    triton_act_quant.act_quant_tuned.configs = triton_act_quant.act_quant_tuned.configs[:1]
    triton_fp8_act_quant.fp8_act_quant_tuned.configs = triton_fp8_act_quant.fp8_act_quant_tuned.configs[:1]
    triton_act_quant.codes_projection_tuned.configs = triton_act_quant.codes_projection_tuned.configs[:1]
    triton_int_gemm.int_gemm_tuned.configs = triton_int_gemm.int_gemm_tuned.configs[3:4]


def _model_helpers():
    """tests/qdiff/lowbit/test_lowbit_model.py: calibrated(qconfig) -> (fp, fake-quant tiny STDiT), inputs()."""
    import importlib.util

    path = REPO / "tests/qdiff/lowbit/test_lowbit_model.py"
    spec = importlib.util.spec_from_file_location("lowbit_model_helpers", path)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def check_compiled(params: dict) -> str:
    """compile_blocks of the tiny STDiT (float, fake-quant or IntLinear) vs the same model eager, on the device."""
    from qdiff.api import compile_model
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int

    helpers = _model_helpers()
    if not INTERPRET:
        _single_tile_autotuners()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = _device()
    qconfig = apply_overrides(QuantConfig.from_yaml(REPO / f"configs/quant/{params['yaml'] or 'w8a8_qvdit'}.yaml"),
                              ["distill.enabled=false"])
    fp, model = helpers.calibrated(qconfig)
    if params["kind"] == "float":
        model = fp.to(device).to(torch.bfloat16)
    else:
        model = model.to(device)
        if params["kind"] == "int":
            convert_to_int(model, backend="auto")  # IntLinear, or FP8Linear for FP8 configs
    x, t, y, mask = (v.to(device) for v in helpers.inputs())
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x, y = x.to(dtype), y.to(dtype)
    with torch.no_grad():
        eager = model(x, t, y, mask=mask).float()
        compile_model(model, backend="aot_eager" if INTERPRET else "inductor", int_act_quant=params["act_quant"])
        compiled = model(x, t, y, mask=mask).float()
        again = model(x, t, y, mask=mask).float()  # no recompilation, same result
    compile_model(model, enabled=False)
    error = float((compiled - eager).norm() / eager.norm())
    assert torch.equal(compiled, again), "a second compiled call differs"
    # bf16: LayerNorm/softmax fused in float32 round differently; float32: a few codes move by one step
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-2
    assert error < bound, f"compiled vs eager rel L2 {error:.2e} (bound {bound})"
    return f"{dtype} compiled vs eager rel L2 {error:.1e}"


def check_model(params: dict) -> str:
    """The tiny STDiT of tests/qdiff/lowbit in IntLinear form: Triton path (fused producers) vs torch path."""
    import copy

    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int, set_int_backend

    helpers = _model_helpers()
    if not INTERPRET:
        _single_tile_autotuners()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    qconfig = apply_overrides(QuantConfig.from_yaml(REPO / f"configs/quant/{params['yaml']}.yaml"),
                              ["distill.enabled=false"])
    _, model = helpers.calibrated(qconfig)
    convert_to_int(model, backend="torch")
    x, t, y, mask = helpers.inputs()
    with torch.no_grad():
        reference = model(x, t, y, mask=mask)
        device = _device()
        gpu = copy.deepcopy(model).to(device)
        set_int_backend(gpu, "triton")
        inputs = [v.to(device) for v in (x, t, y, mask)]
        out = gpu(*inputs[:3], mask=inputs[3]).cpu()
        error = float((out - reference).norm() / reference.norm())
        # CPU and GPU float ops differ in the last bits, which moves a few codes by one step: the bound
        assert error < 1e-2, f"float32 rel L2 vs torch path {error:.2e}"
        if not params["bf16"]:
            return f"fp32 rel L2 {error:.1e}"
        half = gpu.to(torch.bfloat16)(*inputs[:3], mask=inputs[3]).float().cpu()
        half_error = float((half - reference).norm() / reference.norm())
        assert half_error < 0.25, f"bfloat16 rel L2 vs float32 torch path {half_error:.2e}"  # sane, not garbage
    return f"fp32 rel L2 {error:.1e}, bf16 {half_error:.1e}"


def run_variant(variant: tuple) -> tuple[str, str, str, float]:
    """(name, PASS/FAIL/SKIP, detail, seconds) of one variant; never raises."""
    name, kind, params = variant
    started = time.time()
    torch.set_num_threads(2)  # many workers share the host's cores
    if INTERPRET:
        install_interpreter_shims()
        if kind.startswith("tuned"):
            return name, "SKIP", "autotuning needs a GPU", 0.0
    try:
        detail = {"act": check_act, "proj": check_proj, "gemm": check_gemm, "model": check_model,
                  "compiled": check_compiled, "attn": check_attn, "cross": check_cross, "cross_fp8": check_cross_fp8,
                  "fp8": check_fp8,
                  "tuned_act": lambda p: check_act(p, tuned=True), "tuned_proj": lambda p: check_proj(p, tuned=True),
                  "tuned_gemm": lambda p: check_gemm(p, tuned=True),
                  "tuned_fp8": lambda p: check_fp8(p, tuned=True)}[kind](params)
        status = "PASS"
    except Exception as exc:  # noqa: BLE001 - reported per variant
        status = "FAIL"
        detail = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
        if not isinstance(exc, AssertionError):
            detail += " | " + traceback.format_exc(limit=-3).replace("\n", " ")[-600:]
    return name, status, detail, time.time() - started


def install_interpreter_shims() -> None:
    """Make Triton 3.6's CPU interpreter behave as the GPU where this project depends on it (idempotent).

    NumPy >= 2.4 refuses int() of the 1-element arrays the interpreter uses for runtime loop bounds; the
    interpreter casts float32 -> bfloat16 by truncation, where the GPU (and torch) round to nearest even; its
    `tl.dot` multiplies bf16 operands as their raw uint16 bits (the GPU multiplies the values, exactly, in float32);
    and its float32 -> float8e4nv cast (Triton 3.6 to 3.9) rounds ties away from zero and ORs a mantissa carry into
    the exponent (1.97 -> 1.0), where the GPU's `cvt.rn.satfinite` and torch round to nearest even (saturating at
    ±448 on the GPU: the shim clamps, then casts with torch).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_qdiff_shims", False):
        return
    interpreter._qdiff_shims = True
    try:
        int(np.array([1]))
    except TypeError:
        patch_tensor = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            value = torch.from_numpy(np.ascontiguousarray(src.data)).clamp(-448.0, 448.0)
            return interpreter.TensorHandle(value.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp
    dot = interpreter.InterpreterBuilder.create_dot

    def widened(handle):  # bf16 is held as uint16 bits: its float32 value has the same upper 16 bits (exact)
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def run_all(jobs: int = 12, only: str = ""):
    """Yield (name, status, detail, seconds) of every variant whose name contains `only`, as they finish."""
    todo = [v for v in variants() if only in v[0]]
    if jobs <= 1:
        yield from map(run_variant, todo)
        return
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
        yield from pool.imap_unordered(run_variant, todo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=12, help="worker processes (1: run here)")
    p.add_argument("--only", default="", help="run the variants whose name contains this text")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not INTERPRET:
        print("check_int_kernels needs a CUDA GPU (or TRITON_INTERPRET=1 to check the script on the CPU)", file=sys.stderr)
        return 2
    started = time.time()
    failed, count = [], 0
    for name, status, detail, seconds in run_all(args.jobs, args.only):
        print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)
        count += 1
        if status == "FAIL":
            failed.append(name)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    print(f"{count} variants on {device} in {time.time() - started:.0f} s: {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
