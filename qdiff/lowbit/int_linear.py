"""IntLinear: the inference layer of a calibrated QuantLinear with integer weights and an integer GEMM.

For x [..., K] (temporal layers: [B·S, T, K], one row per frame), with the notation of QuantLinear:
  x' = (x / s) · H                                  smoothing / rotation, in x's dtype, as QuantLinear does
  (X, s_x, z_x) = per-token codes of x'             `qdiff.kernels.act_quant` (A6: int8 codes on the 6-bit grid)
  y = s_x·s_w·(X − z_x)(W − z_w)ᵀ + bias + f_m·(x̂ · A_outᵀ)·B_outᵀ      `qdiff.kernels.int_gemm`
where W are the weight codes of Q_w(W' + B·A) (the pre-quantizer TQE term is folded into W before quantizing)
and f_m = 1 + m_t on temporal layers (the post term sits once in W_eff and once more scaled by m_t), 1 elsewhere.
The output equals QuantLinear's fake-quant output up to float32 summation order, in x's dtype.

On CUDA the two steps run as Triton kernels; elsewhere (and with backend='torch') as their PyTorch references.

Under torch.compile (`qdiff.api.compile_model`; call `prepare()` first, which it does) the GEMM is the opaque custom
op `torch.ops.qdiff.int_gemm` and the activation quantization is plain torch ops (`quantize_per_token_torch`, the
reference's math), which inductor fuses into the op producing x (LayerNorm + modulate, GELU, a layout copy);
`compile_act_quant = "kernel"` keeps the Triton quantization kernel instead (as the op
`torch.ops.qdiff.quantize_per_token`), and `"fused"` also fuses the producers LayerNorm + modulate and GELU into
that op (`qdiff.lowbit.fused`) and divides approximately (the fastest kernels on an H100, docs/benchmarks.md;
a code may move by one step on a rounding tie). The shared-input memo (weak references, version counters) is not used there:
q, k and v each quantize their shared input, and the compiler fuses the three into the kernel that reads it.
Eager forwards are unchanged.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import nn

from qdiff.kernels.act_quant import ActCodes, project_codes, quantize_per_token, quantize_per_token_torch, smooth_input
from qdiff.kernels.act_quant import grid as act_grid
from qdiff.kernels.int_gemm import MAX_K, int_gemm
from qdiff.lowbit.pack import code_offset, container_for, pack_codes, unpack_codes
from qdiff.quantizers.uniform import DynamicActQuantizer, StaticActQuantizer, quant_range

ACT_MODES = ("dynamic_per_token", "static_per_tensor")
BACKENDS = ("auto", "torch", "triton")
COMPILE_ACT_QUANT = ("torch", "kernel", "fused")


class IntExportError(ValueError):
    """A QuantLinear cannot be turned into integer form; the message says why and what to do."""


class QuantizedInput(NamedTuple):
    """An activation handed to the IntLinear layers that read it already quantized (`qdiff.lowbit.fused`).

    shape: the activation's shape (..., K); dtype: its dtype (the layers' output dtype);
    acts: {layer: (ActCodes of its M = prod(shape[:-1]) token rows, TQE projection [M, r] float32 or None)}.
    """

    shape: torch.Size
    dtype: torch.dtype
    acts: dict

    def reshape(self, *shape: int) -> "QuantizedInput":
        """The same rows under another leading shape (as Tensor.reshape of a contiguous activation; one -1 allowed).
        Plain integer arithmetic, so torch.compile traces it without tensors."""
        numel = math.prod(self.shape)
        known = math.prod([size for size in shape if size != -1])
        if shape.count(-1) > 1 or (shape.count(-1) and (known == 0 or numel % known)):
            raise ValueError(f"cannot reshape {tuple(self.shape)} to {shape}")
        new = torch.Size([numel // known if size == -1 else size for size in shape])
        if math.prod(new) != numel:
            raise ValueError(f"cannot reshape {tuple(self.shape)} to {shape}")
        return self._replace(shape=new)


class SharedInputQuant:
    """One-entry memo of per-token activation codes, shared by the IntLinear layers of one model.

    Sibling layers that read the same input tensor with the same activation grid and no balancing (q, k and v
    of an attention) quantize it once; each then forms its own TQE projection from the codes. The entry is keyed
    by the input's identity (a weak reference), its version counter (bumped by in-place writes) and the grid,
    so a different or modified tensor is never served stale codes. A deep copy starts empty.
    """

    def __init__(self):
        self.key: tuple | None = None
        self.value: ActCodes | None = None
        self.hits = 0

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        if x.is_inference():  # inference-mode tensors track no version: never memoised
            return None
        return x._version

    def lookup(self, x: torch.Tensor, signature: tuple) -> ActCodes | None:
        version = self._version(x)
        if version is not None and self.key is not None and self.key[0]() is x and self.key[1:] == (version, signature):
            self.hits += 1
            return self.value
        return None

    def store(self, x: torch.Tensor, signature: tuple, value: ActCodes) -> None:
        version = self._version(x)
        if version is None:
            self.key, self.value = None, None
        else:
            self.key, self.value = (weakref.ref(x), version, signature), value

    def __deepcopy__(self, memo):
        return SharedInputQuant()


class LowBitLinear(nn.Module):
    """What the low-bit inference layers (IntLinear, FP8Linear) share: their buffers follow device moves but not dtype
    casts (codes and float32 scales must survive model.to(torch.bfloat16); float8 even counts as floating point),
    their persistent bytes, the input shape check of forward, and the repr of the float terms around the GEMM."""

    def _apply(self, fn, recurse=True):
        target = fn(torch.zeros((), device=self.w_scale.device)).device
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.device != target:
                self._buffers[name] = buffer.to(target)
        return self

    def weight_bytes(self) -> int:
        """Bytes of every persistent tensor of the layer (codes, scales, zero points, bias, TQE, balancing)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _check_input(self, x: torch.Tensor | QuantizedInput) -> None:
        """ValueError unless x is [..., K] (temporal layers: [B·S, T, K])."""
        if self.frame_scale is not None and (len(x.shape) < 2 or x.shape[-2] != self.num_frames):
            raise ValueError(f"temporal layer expects x [B*S, {self.num_frames}, d_in], got {tuple(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected x [..., {self.in_features}], got {tuple(x.shape)}")

    def _side_terms_repr(self) -> list[str]:
        parts = [f"rank_out={self.rank_out}"] if self.rank_out else []
        if self.frame_scale is not None:
            parts.append(f"num_frames={self.num_frames}")
        if self.smooth_scale is not None:
            parts.append("smooth")
        if self.rotation is not None:
            parts.append("rotation")
        return parts


class IntLinear(LowBitLinear):
    """Linear layer with integer weight codes and per-token integer activations (see the module docstring).

    Args:
        in_features, out_features: K, N.
        w_bits, a_bits: 2..8. Weights of ≤ 4 bits are stored two per byte ("int4x2"), others as int8.
        w_symmetric, a_symmetric: signed grids without zero points.
        act_mode: "dynamic_per_token" (ranges per token row at run time) or "static_per_tensor" (calibrated Δ, z).
        bias: whether the layer has a bias.
        num_frames: T for temporal layers (x [B·S, T, K]); with rank_out > 0 they carry a per-frame factor.
        rank_out: rank r of TQE's post-quantizer term (0 = none).
        smooth: whether a smoothing scale s [K] divides the input.
        rotation: whether an orthonormal H [K, K] rotates the input.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Buffers (persistent unless noted): qweight int8 [N, K] or uint8 [N, ⌈K/2⌉]; w_scale f32 [N];
    w_zero int32 [N] (affine weights); bias f32 [N]; smooth_scale f32 [K]; post_a f32 [r, K]; post_b f32 [N, r];
    frame_scale f32 [T] (m_t); act_static f32 [2] = (Δ, z) for static activations; rotation f32 [K, K]
    (non-persistent: files store each distinct rotation once); w_colsum int32 [N] (non-persistent, derived).
    """

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, *, w_symmetric: bool = False,
                 a_symmetric: bool = False, act_mode: str = "dynamic_per_token", bias: bool = True,
                 num_frames: int | None = None, rank_out: int = 0, smooth: bool = False, rotation: bool = False,
                 backend: str = "auto", device=None):
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode: expected one of {list(ACT_MODES)}, got {act_mode!r}")
        if in_features > MAX_K:
            raise ValueError(f"in_features={in_features} exceeds {MAX_K}: the int32 accumulator could overflow")
        container = container_for(w_bits)
        act_grid(a_bits, a_symmetric)  # validates a_bits
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits = w_bits, a_bits
        self.w_symmetric, self.a_symmetric, self.act_mode = w_symmetric, a_symmetric, act_mode
        self.num_frames, self.rank_out = num_frames, rank_out
        self.container = container
        self.backend = backend
        factory = dict(device=device)
        width = (in_features + 1) // 2 if container == "int4x2" else in_features
        dtype = torch.uint8 if container == "int4x2" else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=dtype, **factory))
        self.register_buffer("w_scale", torch.ones(out_features, **factory))
        self.register_buffer("w_zero", None if w_symmetric else torch.zeros(out_features, dtype=torch.int32, **factory))
        self.register_buffer("bias", torch.zeros(out_features, **factory) if bias else None)
        self.register_buffer("smooth_scale", torch.ones(in_features, **factory) if smooth else None)
        self.register_buffer("post_a", torch.zeros(rank_out, in_features, **factory) if rank_out else None)
        self.register_buffer("post_b", torch.zeros(out_features, rank_out, **factory) if rank_out else None)
        use_frames = num_frames is not None and rank_out > 0
        self.register_buffer("frame_scale", torch.zeros(num_frames, **factory) if use_frames else None)
        self.register_buffer("act_static", torch.tensor([1.0, 0.0], **factory) if act_mode == "static_per_tensor" else None)
        self.register_buffer("rotation", torch.eye(in_features, **factory) if rotation else None, persistent=False)
        self.register_buffer("w_colsum", None, persistent=False)
        self._static_values: tuple[float, float] | None = None
        self.input_memo: SharedInputQuant | None = None  # set by convert_to_int / load_int_model
        # accept a QuantizedInput from a fused producer (`qdiff.lowbit.fused.set_fusion`); off by default: on an
        # H100 it did not pay and its bf16 LayerNorm rounds differently from torch's (docs/int_kernels.md)
        self.fuse_input = False
        # under torch.compile: "torch" = plain-torch quantization fused by the compiler, "kernel" = the Triton kernel
        # (dynamic ranges only; static ranges always take the torch ops), "fused" = the kernel with its producer
        # (LayerNorm + modulate, GELU) fused in and approximate division
        self.compile_act_quant = "torch"

    # ------------------------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer, backend: str = "auto") -> "IntLinear":
        """Integer form of a calibrated, unfolded QuantLinear (its timestep range 0; R = 1 is required).

        Weight codes: q = clamp(round((W' + B·A)/Δ) + z) on exactly the fake quantizer's grid (checked: the
        dequantized codes must equal the fake quantizer's output bit for bit, else RuntimeError).
        Raises IntExportError for layers the integer path does not cover (named in the message).
        """
        _check_exportable(layer)
        wq, act = layer.weight_quantizer, layer.act_quantizer
        w_cfg = wq.cfg
        static = isinstance(act, StaticActQuantizer)
        rotation = layer._rotation()
        smooth = layer._smooth_scale(0)
        int_layer = cls(
            layer.in_features, layer.out_features, w_cfg.bits, act.cfg.bits, w_symmetric=w_cfg.symmetric,
            a_symmetric=act.cfg.symmetric, act_mode=act.cfg.mode, bias=layer.bias is not None,
            num_frames=layer.num_frames if layer.frame_scale is not None else None,
            rank_out=0 if layer.lora_a_out is None else layer.lora_a_out.shape[0],
            smooth=smooth is not None, rotation=rotation is not None, backend=backend,
            device=layer.act_absmax.device,
        )
        # weight codes of Q_w(W' + B·A), computed as WeightQuantizer.forward computes them
        weight = layer.balanced_weight(0)
        if layer.lora_a is not None:
            weight = weight + layer.lora_b @ layer.lora_a
        delta, zero = wq.delta[0].reshape(-1, 1).float(), wq.zero_point[0].reshape(-1, 1).float()  # [N, 1]
        q_min, q_max = quant_range(w_cfg.bits, w_cfg.symmetric)
        scaled = torch.round(weight / delta)
        q = torch.clamp(scaled if w_cfg.symmetric else scaled + zero, q_min, q_max)
        dequant = q * delta if w_cfg.symmetric else (q - zero) * delta
        fake = wq(weight, 0)
        if not torch.equal(dequant, fake):
            raise RuntimeError(f"integer weights do not reproduce the fake quantizer (max diff "
                               f"{(dequant - fake).abs().max().item():.3g}); report this as a bug")
        offset = code_offset(w_cfg.bits, w_cfg.symmetric)
        codes = (q - offset).to(torch.int16)
        int_layer.qweight.copy_(pack_codes(codes, w_cfg.bits))
        int_layer.w_scale.copy_(delta[:, 0])
        if not w_cfg.symmetric:
            int_layer.w_zero.copy_((zero[:, 0] - offset).to(torch.int32))
        copy_side_terms(int_layer, layer, smooth, rotation)
        if static:
            int_layer.act_static.copy_(torch.tensor(_static_range(act), device=int_layer.act_static.device))
        return int_layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.w_colsum = None  # derived from qweight: recomputed at the next forward
        self._static_values = None

    # ------------------------------------------------------------------------------ forward
    def weight_codes(self) -> torch.Tensor:
        """Signed weight codes int8 [N, K] (unpacked from the container)."""
        return unpack_codes(self.qweight, self.w_bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(W − z_w)·s_w in float32 [N, K]: the integer part of the fake-quant W_eff (post term excluded)."""
        codes = self.weight_codes().float()
        if self.w_zero is not None:
            codes = codes - self.w_zero.float()[:, None]
        return codes * self.w_scale[:, None]

    def prepare(self) -> None:
        """Derive w_colsum and the static range's host copy now (forwards otherwise do it on first use). Needed
        before torch.compile: a compiled forward reads them but does not create them."""
        self._prepare()

    def _prepare(self) -> None:
        if torch.compiler.is_compiling():
            if self.w_colsum is None:
                raise RuntimeError("IntLinear under torch.compile: call prepare() (or qdiff.api.compile_model) first")
            return
        if self.w_colsum is None or self.w_colsum.device != self.qweight.device:
            self.w_colsum = self.weight_codes().sum(dim=1, dtype=torch.int32)
        if self.act_static is not None and self._static_values is None:
            self._static_values = (float(self.act_static[0]), float(self.act_static[1]))

    def fast_act_quant(self) -> bool:
        """Approximate division in the activation-quantization kernel: only compiled, with compile_act_quant "fused"."""
        return torch.compiler.is_compiling() and self.compile_act_quant == "fused"

    def input_signature(self) -> tuple:
        """What this layer's activation codes depend on besides x: layers with equal signatures share codes."""
        smooth = None if self.smooth_scale is None else id(self.smooth_scale)
        return self.in_features, self.a_bits, self.a_symmetric, self._static_values, smooth

    def _quantize_input(self, x: torch.Tensor) -> tuple[ActCodes, torch.Tensor | None]:
        """Codes of this layer's input x [..., K] as M token rows, and its TQE projection [M, r] (or None)."""
        x2 = x.reshape(-1, self.in_features)
        smooth = self.smooth_scale
        if self.rotation is not None:  # (x / s) · H in x's dtype, as QuantLinear balances
            x2 = smooth_input(x2, smooth) @ self.rotation.to(x2.dtype)
            smooth = None
        frame_factor = None if self.frame_scale is None else 1.0 + self.frame_scale
        # static ranges always take the torch ops when compiled: a pointwise op with nothing for a kernel to win, and
        # the kernel would need them as Python floats, which the compiler guards on (one recompile per layer)
        if torch.compiler.is_compiling() and (self.compile_act_quant == "torch" or self.act_static is not None):
            act = quantize_per_token_torch(x2, self.a_bits, self.a_symmetric, smooth_scale=smooth,
                                           static=self.act_static, post_a=self.post_a, frame_factor=frame_factor,
                                           rowsum=self.w_zero is not None)
            return act, act.proj
        memo = self.input_memo if self.smooth_scale is None and self.rotation is None else None
        if torch.compiler.is_compiling():  # no memo (weak references, version counters) inside a compiled graph
            memo = None
        if memo is None:  # quantization and the TQE projection in one pass
            act = quantize_per_token(x2, self.a_bits, self.a_symmetric, smooth_scale=smooth, static=self._static_values,
                                     post_a=self.post_a, frame_factor=frame_factor, backend=self.backend,
                                     fast=self.fast_act_quant())
            return act, act.proj
        # codes shared with sibling layers reading the same x; the projection is this layer's own
        act = memo.lookup(x, self.input_signature())
        if act is None:
            act = quantize_per_token(x2, self.a_bits, self.a_symmetric, static=self._static_values,
                                     backend=self.backend)
            memo.store(x, self.input_signature(), act)
        return act, None if self.post_a is None else project_codes(act, self.post_a, frame_factor, backend=self.backend)

    def forward(self, x: torch.Tensor | QuantizedInput) -> torch.Tensor:
        """x [..., K] (temporal layers: [B·S, T, K]) or a QuantizedInput made for this layer -> y [..., N] in x's
        dtype."""
        self._check_input(x)
        self._prepare()
        if isinstance(x, QuantizedInput):
            if self not in x.acts:
                raise ValueError("this QuantizedInput was not quantized for this layer")
            act, proj = x.acts[self]
        else:
            act, proj = self._quantize_input(x)
        y = int_gemm(act.codes, act.scale, None if self.a_symmetric else act.zero,
                     act.rowsum if self.w_zero is not None else None, self.qweight, self.w_scale, self.w_zero,
                     self.w_colsum, bias=self.bias, proj=proj, post_b=self.post_b, out_dtype=x.dtype,
                     k=self.in_features if self.container == "int4x2" else None, backend=self.backend)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ------------------------------------------------------------------------------ reporting
    def layer_info(self) -> dict:
        """JSON-able description (the export header's per-layer entry, rotation filled in by the exporter)."""
        return {
            "in_features": self.in_features, "out_features": self.out_features,
            "w_bits": self.w_bits, "a_bits": self.a_bits, "w_symmetric": self.w_symmetric,
            "a_symmetric": self.a_symmetric, "act_mode": self.act_mode, "container": self.container,
            "w_granularity": "per_channel",
            "a_granularity": "per_token" if self.act_mode == "dynamic_per_token" else "per_tensor",
            "bias": self.bias is not None, "num_frames": self.num_frames if self.frame_scale is not None else None,
            "rank_out": self.rank_out, "smooth": self.smooth_scale is not None,
        }

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"w_bits={self.w_bits} ({self.container})", f"a_bits={self.a_bits} ({self.act_mode})",
                 f"bias={self.bias is not None}"]
        return ", ".join(parts + self._side_terms_repr())


@torch.no_grad()
def copy_side_terms(target: nn.Module, layer, smooth: torch.Tensor | None, rotation: torch.Tensor | None) -> None:
    """Copy a calibrated QuantLinear's float terms around the GEMM into a low-bit layer's buffers: bias, smoothing
    scales, rotation, the TQE post term (A_out, B_out) and its per-frame factors (float32)."""
    if layer.bias is not None:
        target.bias.copy_(layer.bias.float())
    if smooth is not None:
        target.smooth_scale.copy_(smooth)
    if rotation is not None:
        target.rotation.copy_(rotation)
    if target.rank_out:
        target.post_a.copy_(layer.lora_a_out.float())
        target.post_b.copy_(layer.lora_b_out.float())
    if target.frame_scale is not None:
        target.frame_scale.copy_(layer.frame_scale.float().reshape(-1))


def _static_range(quantizer: StaticActQuantizer) -> tuple[float, float]:
    """(Δ, z) of range 0 of a calibrated static quantizer, computed as its forward computes them."""
    x_min, x_max = quantizer.x_min[0], quantizer.x_max[0]
    q_min, q_max = quant_range(quantizer.cfg.bits, quantizer.cfg.symmetric)
    if quantizer.cfg.symmetric:
        delta = (torch.maximum(-x_min, x_max) / q_max).clamp(min=1e-6)
        zero = torch.zeros_like(delta)
    else:
        delta = ((x_max - x_min) / q_max).clamp(min=1e-6)
        zero = torch.round(-x_min / delta)
    return float(delta), float(zero)


def check_export_basics(layer, path: str, wrong_path: str | None = None) -> None:
    """The checks every low-bit export path shares: raise IntExportError when `layer` is folded, keeps a side in
    floating point or has several timestep ranges. `path` names the target in the messages ("integer", "FP8");
    `wrong_path`, when given, is the reason the layer belongs to another path, raised once both sides are known to be
    quantized (before the timestep-range check)."""
    if layer.folded_weight is not None:
        raise IntExportError(f"the layer is folded (fold_model): {path} export needs the unfolded calibrated model "
                             "(load the quant params without --fold)")
    if layer.weight_quantizer is None or layer.act_quantizer is None:
        missing = "weights" if layer.weight_quantizer is None else "activations"
        raise IntExportError(f"its {missing} stay in floating point: the {path} path needs both sides quantized "
                             "(put the layer in fp_layers to keep it nn.Linear)")
    if wrong_path is not None:
        raise IntExportError(wrong_path)
    if layer.num_ranges != 1:
        raise IntExportError(f"it has {layer.num_ranges} timestep ranges: {path} export supports calib.timestep_ranges = 1")


def _check_exportable(layer) -> None:
    """Raise IntExportError naming what keeps `layer` off the integer path."""
    check_export_basics(layer, "integer")
    w_cfg = layer.weight_quantizer.cfg
    if w_cfg.group_size not in (None, layer.in_features):
        raise IntExportError(f"weight.group_size={w_cfg.group_size}: the integer kernels support per-channel weights only")
    if not bool(layer.weight_quantizer.initialized[0]):
        raise IntExportError("its weight quantizer was never initialised (load calibrated quant params first)")
    act = layer.act_quantizer
    if isinstance(act, DynamicActQuantizer) and act.cfg.reference_token_grouping:
        raise IntExportError("act.reference_token_grouping shares ranges across the batch (a parity switch); "
                             "the kernels quantize each token row on its own")
    if isinstance(act, StaticActQuantizer) and not bool(act.observed[0]):
        raise IntExportError("its static activation range was never calibrated")
    if not isinstance(act, (DynamicActQuantizer, StaticActQuantizer)):
        raise IntExportError(f"unsupported activation quantizer {type(act).__name__}")
