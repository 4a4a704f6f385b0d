"""FP8Linear: the inference layer of a calibrated QuantLinear with FP8 (e4m3) activations, on the FP8 tensor cores.

For x [..., K] (temporal layers: [B·S, T, K], one row per frame), with the notation of QuantLinear:
  x' = (x / s) · H                                  smoothing / rotation, in x's dtype, as QuantLinear does
  (X, s_x) = per-token e4m3 codes of x' and their scales [M, 1]      `qdiff.kernels.fp8_quant`
  y = (X · Wᵀ)·s_x·s_w + bias + f_m·(x̂ · A_outᵀ)·B_outᵀ             `fp8_gemm`: torch._scaled_mm, row-wise scales
where W [N, K] holds e4m3 values with per-channel scales s_w [N], in one of two weight formats:
  "fp8_e4m3"  W = e4m3(clamp((W' + B·A) / s_w, ±448)), s_w the FP8 weight quantizer's scale (W8)
  "int"       W = q − z, the integer codes of the (≤ 4-bit affine, ≤ 5-bit symmetric) weight quantizer minus their
              zero point: integers of magnitude ≤ 16, exact in e4m3; s_w = Δ_w. Stored as integer codes (int4 packed
              two per byte, `qdiff.lowbit.pack`) and turned into e4m3 at each forward (`cache_weight` keeps them).
x̂ = X·s_x is the activation the fake-quant model multiplies; f_m = 1 + m_t on temporal layers, 1 elsewhere (the TQE
post term sits once in W_eff and once more scaled by m_t). The output equals QuantLinear's fake-quant output up to
float32 summation order (the codes are the same, the products X·W are exact in float32).

The GEMM (`fp8_gemm`, backend "auto"): torch._scaled_mm(X, Wᵀ, scale_a=s_x [M, 1], scale_b=s_w [1, N],
bias=bias in the output dtype, out_dtype=x's dtype) where the device accepts it (probed once per device, output dtype
and bias: on an H100 the row-wise kernel outputs bf16 only) and K and N are multiples of 16 on CUDA; otherwise, and
with backend "torch", the reference: a float32 matmul of the e4m3 values (exact products, float32 sums), then the
scales and the bias, as _scaled_mm's epilogue does.

Activation quantization (`qdiff.kernels.fp8_quant.quantize_fp8_per_token`): eager, plain torch ops. Under
torch.compile `compile_act_quant` picks (set by `qdiff.api.prepare_compile` from its `int_act_quant`): "torch" (the
default) plain torch ops, which inductor fuses into the op producing x (LayerNorm + modulate, GELU, a layout copy);
"kernel" the Triton kernel as the opaque op `torch.ops.qdiff.quantize_fp8_per_token` (x / s fused, IEEE division);
"fused" that kernel with approximate division, and the producers LayerNorm + modulate and GELU computed inside it
(`qdiff.lowbit.fused`). With a fused producer (eager: `fuse_input`, `qdiff.lowbit.fused.set_fusion`) the layer
receives a `QuantizedInput` holding its `FP8Act` and runs only the GEMM and its TQE post term. On the CPU, and with
backend "torch", the op and the fused path run the torch reference, so the output does not change.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from qdiff.kernels.act_quant import smooth_input
from qdiff.kernels.fp8_quant import FP8_DTYPE, FP8_FORMAT, exact_in_e4m3, quantize_fp8_per_token, to_fp8
from qdiff.lowbit.int_linear import IntExportError, LowBitLinear, QuantizedInput, check_export_basics, copy_side_terms
from qdiff.lowbit.pack import code_offset, container_for, pack_codes, unpack_codes
from qdiff.quantizers.uniform import FP8ActQuantizer, quant_range

W_FORMATS = ("fp8_e4m3", "int")
FP8_BACKENDS = ("auto", "torch", "scaled_mm")
_PROBED: dict[tuple, bool] = {}  # (device type, index, out dtype, bias) -> torch._scaled_mm accepts it


class FP8Act(NamedTuple):
    """Per-token e4m3 codes of an activation: codes float8_e4m3fn [M, K], scale float32 [M, 1] (x̂ = codes·scale)."""

    codes: torch.Tensor
    scale: torch.Tensor


# ------------------------------------------------------------------------------------------------ GEMM
def scaled_mm_supported(device: torch.device | str, out_dtype: torch.dtype, bias: bool = True) -> bool:
    """Whether torch._scaled_mm runs with row-wise float32 scales, e4m3 inputs and this output dtype (and a bias of
    that dtype) on `device`. Probed once with a 16×32×32 call, then cached. Under torch.compile an unprobed case
    answers False (the reference path) instead of probing inside the graph: `FP8Linear.prepare` probes first."""
    device = torch.device(device)
    key = (device.type, device.index, out_dtype, bias)
    if key in _PROBED:
        return _PROBED[key]
    if torch.compiler.is_compiling():
        return False
    try:
        a = torch.zeros(16, 32, device=device).to(FP8_DTYPE)
        w = torch.zeros(32, 32, device=device).to(FP8_DTYPE)
        torch._scaled_mm(a, w.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 32, device=device),
                         bias=torch.zeros(32, device=device, dtype=out_dtype) if bias else None, out_dtype=out_dtype)
        supported = True
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        supported = False
    _PROBED[key] = supported
    return supported


def scaled_mm_shape_ok(device: torch.device, k: int, n: int) -> bool:
    """CUDA's FP8 GEMM needs K and N multiples of 16 (mat1 [M, K] row-major, mat2 [K, N] column-major)."""
    return device.type != "cuda" or (k % 16 == 0 and n % 16 == 0)


def fp8_gemm_reference(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(a·wᵀ)·a_scale·w_scale + bias in float32, cast to out_dtype. a [M, K] e4m3, a_scale [M, 1] f32, w [N, K] e4m3,
    w_scale [N] f32, bias [N] (rounded to out_dtype first, as the GEMM's bias is). The products of e4m3 values are
    exact in float32 (and in TF32): only the summation order differs from the FP8 GEMM's."""
    acc = a.float() @ w.float().t()
    y = acc * a_scale * w_scale[None, :]
    if bias is not None:
        y = y + bias.to(out_dtype).float()
    return y.to(out_dtype)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
             fast_accum: bool = False) -> torch.Tensor:
    """y [M, N] = (a·wᵀ)·a_scale·w_scale + bias in out_dtype (see `fp8_gemm_reference` for the shapes).

    backend "auto": torch._scaled_mm where `scaled_mm_supported` and the shape allows it, else the reference;
    "scaled_mm": always torch._scaled_mm (errors surface); "torch": the reference. fast_accum: _scaled_mm's
    use_fast_accum (Hopper's faster, less precise accumulation; off by default).
    """
    if backend not in FP8_BACKENDS:
        raise ValueError(f"backend: expected one of {list(FP8_BACKENDS)}, got {backend!r}")
    use_kernel = backend == "scaled_mm" or (
        backend == "auto" and scaled_mm_shape_ok(a.device, a.shape[1], w.shape[0])
        and scaled_mm_supported(a.device, out_dtype, bias is not None))
    if not use_kernel:
        return fp8_gemm_reference(a, a_scale, w, w_scale, bias, out_dtype)
    if a.stride(-1) != 1:  # mat1 must be row-major, mat2 (w.t() of a row-major w) column-major
        a = a.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    return torch._scaled_mm(a, w.t(), scale_a=a_scale, scale_b=w_scale[None, :],
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


# ------------------------------------------------------------------------------------------------ layer
class FP8Linear(LowBitLinear):
    """Linear layer with e4m3 weights (or integer codes exact in e4m3) and per-token e4m3 activations.

    Args:
        in_features, out_features: K, N.
        w_format: "fp8_e4m3" (W8: e4m3 weights) or "int" (integer weight codes of ≤ 4 bits affine / ≤ 5 symmetric).
        w_bits: 8 for "fp8_e4m3"; the integer width for "int".
        w_symmetric: integer weights on the signed grid without zero point.
        bias, num_frames, rank_out, smooth, rotation: as IntLinear.
        backend: "auto", "torch" or "scaled_mm" (see `fp8_gemm`).
    Buffers (persistent unless noted): qweight float8_e4m3fn [N, K] ("fp8_e4m3") or the integer container (uint8
    [N, ⌈K/2⌉] int4x2, int8 [N, K]); w_scale f32 [N]; w_zero int32 [N] (affine integer weights); bias f32 [N];
    smooth_scale f32 [K]; post_a f32 [r, K]; post_b f32 [N, r]; frame_scale f32 [T]; rotation f32 [K, K]
    (non-persistent); weight_e4m3 (non-persistent, integer weights with `cache_weight` after `prepare`); bias_bf16
    bf16 [N] (non-persistent, after `prepare`: the GEMM's bias for bf16 inputs, not cast in every forward).
    Attributes: backend; fast_accum (False); cache_weight (False: integer codes are unpacked to e4m3 in every forward,
    a small elementwise op that keeps the memory at the packed size; True: `prepare` keeps the e4m3 copy);
    fuse_input (False: eager, take a QuantizedInput from a fused producer); compile_act_quant ("torch", "kernel" or
    "fused", see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, w_format: str = FP8_FORMAT, w_bits: int = 8, *,
                 w_symmetric: bool = False, bias: bool = True, num_frames: int | None = None, rank_out: int = 0,
                 smooth: bool = False, rotation: bool = False, backend: str = "auto", device=None):
        super().__init__()
        if w_format not in W_FORMATS:
            raise ValueError(f"w_format: expected one of {list(W_FORMATS)}, got {w_format!r}")
        if backend not in FP8_BACKENDS:
            raise ValueError(f"backend: expected one of {list(FP8_BACKENDS)}, got {backend!r}")
        if w_format == FP8_FORMAT and w_bits != 8:
            raise ValueError(f"w_bits: e4m3 weights are 8-bit, got {w_bits}")
        if w_format == "int" and not exact_in_e4m3(w_bits, w_symmetric):
            raise IntExportError(_inexact_message(w_bits, w_symmetric))
        self.in_features, self.out_features = in_features, out_features
        self.w_format, self.w_bits, self.w_symmetric = w_format, w_bits, w_symmetric
        self.a_bits = 8
        self.num_frames, self.rank_out = num_frames, rank_out
        self.backend = backend
        self.fast_accum = False
        self.cache_weight = False
        self.fuse_input = False
        self.compile_act_quant = "torch"
        factory = dict(device=device)
        if w_format == FP8_FORMAT:
            self.container = "float8_e4m3fn"
            qweight = torch.zeros(out_features, in_features, **factory).to(FP8_DTYPE)
        else:
            self.container = container_for(w_bits)
            width = (in_features + 1) // 2 if self.container == "int4x2" else in_features
            qweight = torch.zeros(out_features, width, dtype=torch.uint8 if self.container == "int4x2" else torch.int8,
                                  **factory)
        self.register_buffer("qweight", qweight)
        self.register_buffer("w_scale", torch.ones(out_features, **factory))
        affine_int = w_format == "int" and not w_symmetric
        self.register_buffer("w_zero", torch.zeros(out_features, dtype=torch.int32, **factory) if affine_int else None)
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        self.register_buffer("smooth_scale", torch.ones(in_features, **factory) if smooth else None)
        self.register_buffer("post_a", torch.zeros(rank_out, in_features, **factory) if rank_out else None)
        self.register_buffer("post_b", torch.zeros(out_features, rank_out, **factory) if rank_out else None)
        use_frames = num_frames is not None and rank_out > 0
        self.register_buffer("frame_scale", torch.zeros(num_frames, **factory) if use_frames else None)
        self.register_buffer("rotation", torch.eye(in_features, **factory) if rotation else None, persistent=False)
        self.register_buffer("weight_e4m3", None, persistent=False)
        self.register_buffer("bias_bf16", None, persistent=False)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer, backend: str = "auto") -> "FP8Linear":
        """FP8 form of a calibrated, unfolded QuantLinear with FP8 activations (its timestep range 0).

        The weight codes are computed with exactly the fake quantizer's ops and checked against its output bit for
        bit (RuntimeError otherwise). Raises IntExportError for layers the FP8 path does not cover (named).
        """
        _check_fp8_exportable(layer)
        wq = layer.weight_quantizer
        w_cfg = wq.cfg
        rotation, smooth = layer._rotation(), layer._smooth_scale(0)
        out = cls(layer.in_features, layer.out_features, FP8_FORMAT if wq.fp8 else "int", w_cfg.bits,
                  w_symmetric=w_cfg.symmetric and not wq.fp8, bias=layer.bias is not None,
                  num_frames=layer.num_frames if layer.frame_scale is not None else None,
                  rank_out=0 if layer.lora_a_out is None else layer.lora_a_out.shape[0],
                  smooth=smooth is not None, rotation=rotation is not None, backend=backend,
                  device=layer.act_absmax.device)
        weight = layer.balanced_weight(0)
        if layer.lora_a is not None:
            weight = weight + layer.lora_b @ layer.lora_a
        fake = wq(weight, 0)
        delta = wq.delta[0].reshape(-1, 1).float()  # [N, 1]
        if wq.fp8:
            codes = to_fp8(weight.float(), delta)
            dequant = codes.float() * delta
            out.qweight.copy_(codes)
        else:
            zero = wq.zero_point[0].reshape(-1, 1).float()
            q_min, q_max = quant_range(w_cfg.bits, w_cfg.symmetric)
            scaled = torch.round(weight / delta)
            q = torch.clamp(scaled if w_cfg.symmetric else scaled + zero, q_min, q_max)
            dequant = q * delta if w_cfg.symmetric else (q - zero) * delta
            offset = code_offset(w_cfg.bits, w_cfg.symmetric)
            out.qweight.copy_(pack_codes((q - offset).to(torch.int16), w_cfg.bits))
            if not w_cfg.symmetric:
                out.w_zero.copy_((zero[:, 0] - offset).to(torch.int32))
        if not torch.equal(dequant, fake.float()):
            raise RuntimeError(f"FP8 weights do not reproduce the fake quantizer (max diff "
                               f"{(dequant - fake.float()).abs().max().item():.3g}); report this as a bug")
        out.w_scale.copy_(delta[:, 0])
        copy_side_terms(out, layer, smooth, rotation)
        if not torch.equal(out.e4m3_weight().float() * out.w_scale[:, None], dequant):  # the GEMM's operand
            raise RuntimeError("FP8Linear: the e4m3 weight does not reproduce the fake quantizer; report this as a bug")
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.weight_e4m3 = self.bias_bf16 = None  # derived from qweight and bias: rebuilt by prepare()

    # ------------------------------------------------------------------------------ forward
    def e4m3_weight(self) -> torch.Tensor:
        """The GEMM's weight operand, float8_e4m3fn [N, K]: qweight itself, or the integer codes minus their zero
        point (exact) from the cache or unpacked now."""
        if self.w_format == FP8_FORMAT:
            return self.qweight
        if self.weight_e4m3 is not None and self.weight_e4m3.device == self.qweight.device:
            return self.weight_e4m3
        codes = unpack_codes(self.qweight, self.w_bits, self.in_features).float()
        if self.w_zero is not None:
            codes = codes - self.w_zero.float()[:, None]
        return codes.to(FP8_DTYPE)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the fake-quant model multiplies (post term excluded), float32 [N, K]."""
        return self.e4m3_weight().float() * self.w_scale[:, None]

    def prepare(self) -> None:
        """Probe torch._scaled_mm on this layer's device (bf16, fp16, fp32 outputs), build the bf16 bias and the e4m3
        weight cache when `cache_weight` is on. Needed before torch.compile (a compiled forward does not probe)."""
        device = self.qweight.device
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            scaled_mm_supported(device, dtype, self.bias is not None)
        self.weight_e4m3 = None
        self.bias_bf16 = None if self.bias is None else self.bias.to(torch.bfloat16)
        if self.cache_weight and self.w_format != FP8_FORMAT:
            self.weight_e4m3 = self.e4m3_weight()

    def act_quant_backend(self) -> str:
        """Backend of the activation quantization kernel: "torch" (plain ops) with the reference GEMM, else "auto"
        (the Triton kernel on CUDA, the reference elsewhere)."""
        return "torch" if self.backend == "torch" else "auto"

    def fast_act_quant(self) -> bool:
        """Approximate division in the activation-quantization kernel: only compiled, with compile_act_quant "fused"."""
        return torch.compiler.is_compiling() and self.compile_act_quant == "fused"

    def input_signature(self) -> tuple:
        """What this layer's activation codes depend on besides x: layers with equal signatures share codes."""
        return self.in_features, None if self.smooth_scale is None else id(self.smooth_scale)

    def quantize_input(self, x: torch.Tensor) -> FP8Act:
        """x [..., K] -> FP8Act (e4m3 codes [M, K], scales f32 [M, 1]) of x' = (x / s)·H, M token rows."""
        x2 = x.reshape(-1, self.in_features)
        smooth = self.smooth_scale
        if self.rotation is not None:  # (x / s) · H in x's dtype, as QuantLinear balances
            x2 = smooth_input(x2, smooth) @ self.rotation.to(x2.dtype)
            smooth = None
        kernel = torch.compiler.is_compiling() and self.compile_act_quant != "torch"
        return FP8Act(*quantize_fp8_per_token(x2, smooth, backend=self.act_quant_backend() if kernel else "torch",
                                              fast=self.fast_act_quant()))

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        """x [..., K] (temporal layers: [B·S, T, K]) or a QuantizedInput made for this layer -> y [..., N] in x's
        dtype."""
        self._check_input(x)
        if isinstance(x, QuantizedInput):
            if self not in x.acts:
                raise ValueError("this QuantizedInput was not quantized for this layer")
            codes, scale = x.acts[self][0]
        else:
            codes, scale = self.quantize_input(x)
        # the GEMM rounds its bias to the output dtype: the bf16 copy saves that cast (~200 small kernels per XL/2 step)
        bias = self.bias_bf16 if self.bias_bf16 is not None and x.dtype == torch.bfloat16 else self.bias
        y = fp8_gemm(codes, scale, self.e4m3_weight(), self.w_scale, bias, out_dtype=x.dtype,
                     backend=self.backend, fast_accum=self.fast_accum)
        if self.post_a is not None:
            y = (y.float() + self._post_term(codes, scale)).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _post_term(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """f_m·(x̂·A_outᵀ)·B_outᵀ [M, N] float32, x̂ = codes·scale the quantized activation."""
        dequant = codes.float() * scale  # [M, K]
        if torch.compiler.is_compiling() and self.rank_out <= 8:  # a row reduction the compiler fuses with the rest
            proj = (dequant[:, None, :] * self.post_a[None]).sum(dim=-1)
        else:
            proj = dequant @ self.post_a.t()  # [M, r]
        if self.frame_scale is not None:  # row m -> frame m mod T, factor 1 + m_t
            frames = self.frame_scale.shape[0]
            factor = (1.0 + self.frame_scale).reshape(1, frames, 1)
            proj = (proj.reshape(-1, frames, proj.shape[1]) * factor).reshape(proj.shape)
        return proj @ self.post_b.t()

    # ------------------------------------------------------------------------------ reporting
    def layer_info(self) -> dict:
        """JSON-able description (the export header's per-layer entry, rotation filled in by the exporter)."""
        return {
            "kind": "fp8", "in_features": self.in_features, "out_features": self.out_features,
            "w_format": self.w_format, "a_format": FP8_FORMAT, "w_bits": self.w_bits, "a_bits": 8,
            "w_symmetric": self.w_symmetric, "a_symmetric": True, "act_mode": "dynamic_per_token",
            "container": self.container, "w_granularity": "per_channel", "a_granularity": "per_token",
            "bias": self.bias is not None, "num_frames": self.num_frames if self.frame_scale is not None else None,
            "rank_out": self.rank_out, "smooth": self.smooth_scale is not None,
        }

    @classmethod
    def from_info(cls, info: dict, backend: str = "auto") -> "FP8Linear":
        """An empty layer shaped as a `layer_info` entry describes (rotation: whether info names one)."""
        return cls(info["in_features"], info["out_features"], info["w_format"], info["w_bits"],
                   w_symmetric=info["w_symmetric"], bias=info["bias"], num_frames=info["num_frames"],
                   rank_out=info["rank_out"], smooth=info["smooth"], rotation=info.get("rotation") is not None,
                   backend=backend)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"w_format={self.w_format}" + ("" if self.w_format == FP8_FORMAT else f" ({self.w_bits}-bit codes)"),
                 "a_format=fp8_e4m3 (per token)", f"bias={self.bias is not None}"]
        return ", ".join(parts + self._side_terms_repr())


def _inexact_message(bits: int, symmetric: bool) -> str:
    grid = "symmetric" if symmetric else "affine"
    return (f"{bits}-bit {grid} integer weight codes are not exact in e4m3 (|q - z| reaches "
            f"{2 ** (bits - 1) if symmetric else 2 ** bits - 1} > 16), so the FP8 GEMM cannot take them: use "
            "weight.format_8bit: fp8_e4m3 for 8-bit layers (FP8 weights), or integer activations (IntLinear)")


def is_fp8_layer(layer) -> bool:
    """Whether a QuantLinear quantizes its activations to FP8 (and so exports to FP8Linear)."""
    return isinstance(layer.act_quantizer, FP8ActQuantizer)


def _check_fp8_exportable(layer) -> None:
    """Raise IntExportError naming what keeps `layer` off the FP8 path."""
    check_export_basics(layer, "FP8",
                        wrong_path=None if is_fp8_layer(layer) else "its activations are not FP8 (act.format: fp8_e4m3)")
    if layer.step_bits:
        raise IntExportError("its bits change per timestep (step_bits): export holds one weight per layer")
    wq = layer.weight_quantizer
    if wq.num_groups != 1:
        raise IntExportError(f"weight.group_size={wq.cfg.group_size}: the FP8 GEMM takes per-channel weight scales only")
    if not wq.fp8 and not exact_in_e4m3(wq.cfg.bits, wq.cfg.symmetric):
        raise IntExportError(_inexact_message(wq.cfg.bits, wq.cfg.symmetric))
    if not bool(wq.initialized[0]):
        raise IntExportError("its weight quantizer was never initialised (load calibrated quant params first)")
