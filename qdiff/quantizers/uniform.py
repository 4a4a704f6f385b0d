"""Uniform fake quantization: STE rounding, range initialisation, weight and activation quantizers.

Notation (METHOD.md §3): b bits, step Δ, zero point z.
  affine:    q = clamp(round(x/Δ) + z, 0, 2^b − 1),          x̂ = (q − z)·Δ
  symmetric: q = clamp(round(x/Δ), −2^(b−1), 2^(b−1) − 1),   x̂ = q·Δ   (z = 0)
Rounding goes through a straight-through estimator, so x and Δ both receive gradients.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from qdiff.kernels.fake_quant import fake_quant_per_token, fake_quant_per_token_reference
from qdiff.kernels.fp8_quant import FP8_FORMAT, fake_quant_fp8, fake_quant_fp8_per_token, fp8_row_scale
from qdiff.quantizers.config import ActQuantConfig, WeightQuantConfig

# Smallest weight step: only reached by all-zero rows/groups, whose reconstruction stays exact.
_MIN_WEIGHT_DELTA = 1e-8
# Smallest activation step (the reference's epsilon), applied per token row here.
_MIN_ACT_DELTA = 1e-6
# The reference's scoring pass divides by Δ + 1e-4 and rounds the final zero point of Δ + 1e-5.
_GRID_SCORE_EPS = 1e-4
_GRID_ZP_EPS = 1e-5
_GRID_STEP = 0.02


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def quant_range(n_bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid [q_min, q_max] for `n_bits` (signed when `symmetric`)."""
    if symmetric:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def fake_quant(
    x: torch.Tensor,
    delta: torch.Tensor,
    zero_point: torch.Tensor,
    n_bits: int,
    symmetric: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize `x` with a straight-through round.

    Args:
        x: any shape.
        delta, zero_point: broadcastable to `x` (zero_point is ignored when `symmetric`).
    Returns:
        x̂, same shape as `x`; gradients flow to `x` (inside the clamp range) and to `delta`.
    """
    q_min, q_max = quant_range(n_bits, symmetric)
    if symmetric:
        return torch.clamp(round_ste(x / delta), q_min, q_max) * delta
    return (torch.clamp(round_ste(x / delta) + zero_point, q_min, q_max) - zero_point) * delta


def _signed_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise min (clamped ≤ 0) and max (clamped ≥ 0) over the last dim of x [..., n]."""
    return x.amin(dim=-1).clamp(max=0.0), x.amax(dim=-1).clamp(min=0.0)


@torch.no_grad()
def min_max_channelwise(
    w: torch.Tensor, n_bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range per row of w [d_out, ...] -> (delta [d_out], zero_point [d_out])."""
    rows = w.reshape(w.shape[0], -1)
    x_min, x_max = _signed_min_max(rows)
    q_min, q_max = quant_range(n_bits, symmetric)
    if symmetric:
        delta = (torch.maximum(-x_min, x_max) / q_max).clamp(min=_MIN_WEIGHT_DELTA)
        return delta, torch.zeros_like(delta)
    delta = ((x_max - x_min) / q_max).clamp(min=_MIN_WEIGHT_DELTA)
    return delta, torch.round(-x_min / delta)


@torch.no_grad()
def grid_search_lp_channelwise(
    w: torch.Tensor, n_bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping-ratio search per row of w [d_out, ...] -> (delta [d_out], zero_point [d_out]).

    Affine case reproduces the reference `grid_search_lp` exactly (fixtures `qdiff/w*`):
    candidates r·[min, max] for r in {0, 0.02, ..., 0.98} (1.0 is not a candidate), each
    scored by the squared error of a quantize-dequantize pass that divides by Δ_r + 1e-4 and
    uses z_r = round(−min_r / (Δ_r + 1e-4)); the first best r gives Δ = (max_r − min_r)/(2^b − 1)
    and z = round(−min_r/Δ + 1e-5). All-zero rows get Δ = 1e-8, z = 0 instead of the reference's
    NaN. The symmetric case searches r·absmax on the signed grid with the same candidates.
    """
    rows = w.reshape(w.shape[0], -1)
    x_min, x_max = _signed_min_max(rows)
    q_min, q_max = quant_range(n_bits, symmetric)
    # The reference builds the ratios in float32; keep those exact values for parity.
    ratios = torch.arange(0, 1, _GRID_STEP, dtype=torch.float32, device=w.device).to(w.dtype)
    best_error = torch.full_like(x_min, float("inf"))
    best_ratio = torch.zeros_like(x_min)
    for ratio in ratios:
        scaled_min, scaled_max = x_min * ratio, x_max * ratio
        if symmetric:
            cand_delta = torch.maximum(-scaled_min, scaled_max) / q_max
            dequant = torch.clamp(torch.round(rows / (cand_delta + _GRID_SCORE_EPS)[:, None]), q_min, q_max)
            dequant = dequant * cand_delta[:, None]
        else:
            cand_delta = (scaled_max - scaled_min) / q_max
            cand_zp = torch.round(-scaled_min / (cand_delta + _GRID_SCORE_EPS))[:, None]
            quant = torch.round(rows / (cand_delta + _GRID_SCORE_EPS)[:, None]) + cand_zp
            dequant = (torch.clamp(quant, q_min, q_max) - cand_zp) * cand_delta[:, None]
        error = (dequant - rows).pow(2).sum(dim=-1)
        better = error < best_error  # strict: ties keep the first ratio, like argmin
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, ratio, best_ratio)
    scaled_min, scaled_max = x_min * best_ratio, x_max * best_ratio
    if symmetric:
        delta = (torch.maximum(-scaled_min, scaled_max) / q_max).clamp(min=_MIN_WEIGHT_DELTA)
        return delta, torch.zeros_like(delta)
    delta = (scaled_max - scaled_min) / q_max
    degenerate = delta == 0
    delta = torch.where(degenerate, torch.full_like(delta, _MIN_WEIGHT_DELTA), delta)
    zero_point = torch.where(
        degenerate, torch.zeros_like(delta), torch.round(-scaled_min / delta + _GRID_ZP_EPS)
    )
    return delta, zero_point


class WeightQuantizer(nn.Module):
    """Fake quantizer for a linear weight [d_out, d_in] with learnable Δ and fixed zero point.

    Ranges are per output channel (`group_size=None`) or per group of input channels, and
    optionally one set per timestep range (`num_ranges` R > 1, e.g. when channel smoothing
    makes the weight range-dependent). Shapes are fixed at construction so `load_state_dict`
    works on a fresh module:
        delta       [R, d_out, G, 1] parameter (G = d_in / group_size, or 1 per channel)
        zero_point  [R, d_out, G, 1] buffer
        initialized [R] bool buffer
    Each range is initialised (cfg.init) from the first weight it quantizes, or by `init_from`.
    With `cfg.quant_format == "fp8_e4m3"` (per channel only) Δ is the FP8 scale, initialised to absmax/448 of each
    output channel, z stays 0, and the forward is `qdiff.kernels.fp8_quant.fake_quant_fp8` (the cast to e4m3
    instead of the integer grid); Δ is learnable the same way.
    """

    def __init__(self, cfg: WeightQuantConfig, out_features: int, in_features: int, num_ranges: int = 1):
        super().__init__()
        if num_ranges < 1:
            raise ValueError(f"num_ranges: must be >= 1, got {num_ranges}")
        group_size = cfg.group_size or in_features
        if in_features % group_size != 0:
            raise ValueError(f"group_size: {group_size} does not divide in_features={in_features}")
        self.cfg = cfg
        self.out_features, self.in_features = out_features, in_features
        self.num_ranges = num_ranges
        self.num_groups = in_features // group_size
        self.fp8 = cfg.quant_format == FP8_FORMAT
        if self.fp8 and self.num_groups != 1:
            raise ValueError(f"group_size: FP8 weights have one scale per output channel, got {cfg.group_size}")
        shape = (num_ranges, out_features, self.num_groups, 1)
        self.delta = nn.Parameter(torch.ones(shape), requires_grad=cfg.learnable_delta)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros(num_ranges, dtype=torch.bool))
        # Host-side mirror of `initialized`, so forwards never sync with the device to read it.
        self._known_initialized = [False] * num_ranges

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = [False] * self.num_ranges

    @torch.no_grad()
    def init_from(self, w: torch.Tensor, range_index: int = 0) -> None:
        """Set Δ and z of range `range_index` from w [d_out, d_in] with cfg.init."""
        groups = w.detach().reshape(self.out_features * self.num_groups, -1)  # [d_out*G, g]
        if self.fp8:  # absmax / 448 per output channel, no zero point
            delta = fp8_row_scale(groups.float())[:, 0]
            zero_point = torch.zeros_like(delta)
        else:
            search = grid_search_lp_channelwise if self.cfg.init == "grid_search_lp" else min_max_channelwise
            delta, zero_point = search(groups, self.cfg.bits, self.cfg.symmetric)
        self.delta[range_index].copy_(delta.reshape(self.out_features, self.num_groups, 1))
        self.zero_point[range_index].copy_(zero_point.reshape(self.out_features, self.num_groups, 1))
        self.initialized[range_index] = True
        self._known_initialized[range_index] = True

    def is_initialized(self, range_index: int = 0) -> bool:
        """Whether range `range_index` has Δ and z (reads the device flag once, then a host mirror)."""
        if not self._known_initialized[range_index] and bool(self.initialized[range_index]):
            self._known_initialized[range_index] = True
        return self._known_initialized[range_index]

    def forward(self, w: torch.Tensor, range_index: int = 0) -> torch.Tensor:
        """w [d_out, d_in] -> fake-quantized ŵ [d_out, d_in] with the ranges of `range_index`."""
        if not self.is_initialized(range_index):
            self.init_from(w, range_index)
        grouped = w.reshape(self.out_features, self.num_groups, -1)  # [d_out, G, g]
        delta, zero_point = self.delta[range_index], self.zero_point[range_index]
        if self.fp8:
            return fake_quant_fp8(grouped.float(), delta).reshape(w.shape)  # float32, as the integer grid gives
        return fake_quant(grouped, delta, zero_point, self.cfg.bits, self.cfg.symmetric).reshape(w.shape)

    def extra_repr(self) -> str:
        if self.fp8:
            return f"format={FP8_FORMAT}, per_channel, num_ranges={self.num_ranges}"
        return (
            f"bits={self.cfg.bits}, symmetric={self.cfg.symmetric}, group_size={self.cfg.group_size}, "
            f"init={self.cfg.init}, num_ranges={self.num_ranges}"
        )


class _LastFakeQuant:
    """One-entry memo of the fused per-token fake quant, for layers that share an input.

    q, k and v (and any other siblings) receive the same tensor; without balancing their quantized
    inputs are identical, so the second and third calls return the first result. The entry is keyed
    by the input's identity (a weak reference), its version counter (bumped by in-place writes) and
    the bit width, and the result's own version is checked, so a modified or different tensor is
    never served a stale result.
    """

    def __init__(self):
        self.key, self.result, self.result_version = None, None, -1

    def __call__(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if (self.key is not None and self.key[0]() is x and self.key[1:] == (x._version, bits)
                and self.result._version == self.result_version):  # nobody wrote into the result either
            return self.result
        result = fake_quant_per_token(x, bits)
        self.key, self.result, self.result_version = (weakref.ref(x), x._version, bits), result, result._version
        return result


_shared_input_fake_quant = _LastFakeQuant()


class DynamicActQuantizer(nn.Module):
    """Min-max activation quantizer whose ranges are computed from each input at run time.

    Default: every token row x[..., :] of every sample gets its own range (min clamped ≤ 0,
    max ≥ 0, Δ = (max − min)/(2^b − 1) clamped to ≥ 1e-6 per row, z = round(−min/Δ)), so
    all-zero rows reconstruct exactly and nothing is NaN.
    `reference_token_grouping=True` reproduces the reference (METHOD.md §3 quirks a, b): for
    x [B, N, C] token position n shares one range over all B·C values, and if any Δ < 1e-6
    every Δ of the tensor becomes 1e-6.
    Δ and z stay attached to the graph, as in the reference.
    """

    def __init__(self, cfg: ActQuantConfig):
        super().__init__()
        if cfg.mode != "dynamic_per_token":
            raise ValueError(f"mode: DynamicActQuantizer needs 'dynamic_per_token', got {cfg.mode!r}")
        self.cfg = cfg

    def forward(self, x: torch.Tensor, range_index: int = 0, bits: int | None = None) -> torch.Tensor:
        """x [..., C] (x [B, N, C] with reference grouping) -> x̂ same shape, at `bits` (default cfg.bits).

        `range_index` is unused (the ranges come from x itself).
        """
        bits = self.cfg.bits if bits is None else bits
        fused = not (self.cfg.reference_token_grouping or self.cfg.symmetric)
        if fused and x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad):
            if torch.compiler.is_compiling():  # the same fp32 math as plain ops: the compiler fuses it into x's
                return fake_quant_per_token_reference(x, bits)  # producer (and dedups q/k/v's shared input)
            return _shared_input_fake_quant(x, bits)  # one Triton pass; same math in fp32
        if self.cfg.reference_token_grouping:
            if x.dim() != 3:
                raise ValueError(f"reference_token_grouping expects x [B, N, C], got shape {tuple(x.shape)}")
            x_min = x.amin(dim=2).amin(dim=0).clamp(max=0.0)[None, :, None]  # [1, N, 1]
            x_max = x.amax(dim=2).amax(dim=0).clamp(min=0.0)[None, :, None]
        else:
            x_min = x.amin(dim=-1, keepdim=True).clamp(max=0.0)  # [..., 1]
            x_max = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
        q_min, q_max = quant_range(bits, self.cfg.symmetric)
        if self.cfg.symmetric:
            delta = torch.maximum(-x_min, x_max) / q_max
        else:
            delta = (x_max - x_min) / q_max
        if self.cfg.reference_token_grouping:  # (a select, not a host sync: no graph break under torch.compile)
            delta = torch.where((delta < _MIN_ACT_DELTA).any(), torch.full_like(delta, _MIN_ACT_DELTA), delta)
        else:
            delta = delta.clamp(min=_MIN_ACT_DELTA)
        zero_point = torch.zeros_like(delta) if self.cfg.symmetric else torch.round(-x_min / delta)
        return fake_quant(x, delta, zero_point, bits, self.cfg.symmetric)

    def extra_repr(self) -> str:
        grouping = "reference_token_grouping" if self.cfg.reference_token_grouping else "per_row"
        return f"bits={self.cfg.bits}, symmetric={self.cfg.symmetric}, {grouping}"


class StaticActQuantizer(nn.Module):
    """Per-tensor activation quantizer with calibrated ranges, one per timestep range.

    While `observing` is True the forward returns x unchanged and widens the running
    [min, max] of range `range_index`; afterwards the frozen range quantizes. Buffers:
        x_min, x_max [R], observed [R] bool.
    The statistics do not depend on the bit width: Δ and z are derived from [min, max] at each
    forward, so one calibration serves every width a per-timestep bit plan selects.
    """

    def __init__(self, cfg: ActQuantConfig, num_ranges: int = 1):
        super().__init__()
        if cfg.mode != "static_per_tensor":
            raise ValueError(f"mode: StaticActQuantizer needs 'static_per_tensor', got {cfg.mode!r}")
        if num_ranges < 1:
            raise ValueError(f"num_ranges: must be >= 1, got {num_ranges}")
        self.cfg = cfg
        self.num_ranges = num_ranges
        self.observing = False
        self.register_buffer("x_min", torch.zeros(num_ranges))
        self.register_buffer("x_max", torch.zeros(num_ranges))
        self.register_buffer("observed", torch.zeros(num_ranges, dtype=torch.bool))
        # Host-side mirror of `observed` (True once seen True), so quantizing forwards never sync to read it.
        self._known_observed = [False] * num_ranges

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_observed = [False] * self.num_ranges

    def is_observed(self, range_index: int = 0) -> bool:
        """Whether range `range_index` was calibrated (reads the device flag until it is True, then a host mirror)."""
        if not self._known_observed[range_index] and bool(self.observed[range_index]):
            self._known_observed[range_index] = True
        return self._known_observed[range_index]

    @torch.no_grad()
    def observe(self, x: torch.Tensor, range_index: int = 0) -> None:
        """Widen the running range of `range_index` with x (any shape)."""
        batch_min = x.detach().amin().clamp(max=0.0).to(self.x_min.dtype)
        batch_max = x.detach().amax().clamp(min=0.0).to(self.x_max.dtype)
        if bool(self.observed[range_index]):
            batch_min = torch.minimum(batch_min, self.x_min[range_index])
            batch_max = torch.maximum(batch_max, self.x_max[range_index])
        self.x_min[range_index] = batch_min
        self.x_max[range_index] = batch_max
        self.observed[range_index] = True
        self._known_observed[range_index] = True

    def forward(self, x: torch.Tensor, range_index: int = 0, bits: int | None = None) -> torch.Tensor:
        """x [...] -> x̂ same shape at `bits` (default cfg.bits); x itself while observing."""
        if self.observing:
            self.observe(x, range_index)
            return x
        if not self.is_observed(range_index):
            raise RuntimeError(f"StaticActQuantizer: range {range_index} was never calibrated (set observing=True first)")
        bits = self.cfg.bits if bits is None else bits
        x_min, x_max = self.x_min[range_index], self.x_max[range_index]
        q_min, q_max = quant_range(bits, self.cfg.symmetric)
        if self.cfg.symmetric:
            delta = (torch.maximum(-x_min, x_max) / q_max).clamp(min=_MIN_ACT_DELTA)
            zero_point = torch.zeros_like(delta)
        else:
            delta = ((x_max - x_min) / q_max).clamp(min=_MIN_ACT_DELTA)
            zero_point = torch.round(-x_min / delta)
        return fake_quant(x, delta.to(x.dtype), zero_point.to(x.dtype), bits, self.cfg.symmetric)

    def extra_repr(self) -> str:
        return f"bits={self.cfg.bits}, symmetric={self.cfg.symmetric}, num_ranges={self.num_ranges}"


class FP8ActQuantizer(nn.Module):
    """Dynamic per-token FP8 (e4m3) activation quantizer: every token row x[..., :] is scaled by its absmax/448 and
    cast to float8_e4m3fn (`qdiff.kernels.fp8_quant`; round to nearest even, saturating at ±448 by a clamp before
    the cast, all-zero rows stay zero). Not one of the papers' quantizers: the activation side of the FP8 GEMM
    path (`qdiff.lowbit.FP8Linear`), which computes exactly these codes. Straight-through rounding; the scale
    stays attached to the graph, as `DynamicActQuantizer`'s Δ does.
    """

    def __init__(self, cfg: ActQuantConfig):
        super().__init__()
        if cfg.format != FP8_FORMAT or cfg.mode != "dynamic_per_token":
            raise ValueError(f"FP8ActQuantizer needs format 'fp8_e4m3' with mode 'dynamic_per_token', got "
                             f"format={cfg.format!r}, mode={cfg.mode!r}")
        self.cfg = cfg

    def forward(self, x: torch.Tensor, range_index: int = 0, bits: int | None = None) -> torch.Tensor:
        """x [..., C] -> x̂ same shape and dtype. `range_index` is unused; `bits` must be None or 8."""
        if bits is not None and bits != 8:
            raise ValueError(f"FP8ActQuantizer: FP8 activations are 8-bit, asked for {bits} bits")
        return fake_quant_fp8_per_token(x)

    def extra_repr(self) -> str:
        return f"format={FP8_FORMAT}, per_token"
