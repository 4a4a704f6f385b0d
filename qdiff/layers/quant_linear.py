"""QuantLinear: a drop-in nn.Linear with fake-quantized weights/activations, TQE and balancing.

Notation (METHOD.md §4, §6), for one timestep range r:
  s  [d_in]        smoothing scales (activations divided, weights multiplied), optional
  H  [d_in, d_in]  orthonormal rotation of the input channels, optional
  x' = (x / s) · H                 W' = (W · s) · H             (x'·W'ᵀ = x·Wᵀ exactly)
  W_eff = Q_w(W' + B·A) + B_out·A_out
  y = Q_a(x') · W_effᵀ + bias                                        (ordinary layers)
  y = Q_a(x') · W_effᵀ + bias + m_t · Q_a(x') · (B_out·A_out)ᵀ        (temporal layers)
Per-timestep bits (ViDiT-Q's timestep-wise mixed precision): `step_bits` lists plan-step intervals
(qdiff.mixed_precision.plan) with their (weight bits, act bits); `select_plan_step` makes one current.
Each extra weight width has its own quantizer (own Δ, z per range) in `step_weight_quantizers`.
Temporal layers see x [B·S, T, d_in] (one row per frame) and carry m [1, T, 1], initialised to
ones, so the post-quantizer term is applied (1 + m_t) times per frame t. This follows the
reference `QuantTemporalAttnLinear`: its weight already contains B_out·A_out and it adds a second
`mask`-scaled product with B_out·A_out, only while weights are quantized.
With both switches off (the default) and no balancing, the forward is exactly F.linear(x, W, b).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.kernels.frame_low_rank import frame_rank1_update_
from qdiff.kernels.weight_quant import fake_quant_weight
from qdiff.quantizers.config import ActQuantConfig, TQEConfig, WeightQuantConfig
from qdiff.quantizers.uniform import DynamicActQuantizer, FP8ActQuantizer, StaticActQuantizer, WeightQuantizer


def _kaiming_uniform(rows: int, cols: int) -> nn.Parameter:
    """A [rows, cols] fp32 parameter initialised like nn.Linear (Kaiming-uniform, a=√5)."""
    tensor = torch.empty(rows, cols, dtype=torch.float32)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return nn.Parameter(tensor)


class QuantLinear(nn.Module):
    """Linear layer with fake quantization, TQE terms and channel balancing.

    Args:
        weight: [d_out, d_in], kept frozen (storage shared with the source layer).
        bias: [d_out] or None, kept frozen.
        weight_cfg: weight quantizer config, or None to keep weights in floating point.
        act_cfg: activation quantizer config, or None to keep activations in floating point.
        tqe: TQE terms (needs weight_cfg), or None for plain Q(W).
        num_frames: T for temporal layers (input [B·S, T, d_in]); enables the per-frame weight.
        num_ranges: number of timestep ranges R with their own weight ranges / smoothing scales /
            activation statistics.
        step_bits: ((low, high, w_bits, a_bits), ...) ascending plan-step intervals and the bits used
            there (None = floating point at those steps); () = the config bits at every step.

    Switches set from outside: `quant_weight`, `quant_act` (both False = FP), `set_range_index`,
    `select_plan_step`, `observe_act_stats` (record the current range's row of `act_absmax` [R, d_in]
    during forwards, momentum `act_stats_momentum`; [d_in] when R = 1). Until `select_plan_step` the
    layer uses its configs' bits.
    TQE parameters are fp32 whatever the weight dtype; the effective weight is cast to x's dtype.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_cfg: WeightQuantConfig | None,
        act_cfg: ActQuantConfig | None,
        tqe: TQEConfig | None = None,
        num_frames: int | None = None,
        num_ranges: int = 1,
        step_bits: tuple = (),
    ):
        super().__init__()
        if tqe is not None and weight_cfg is None:
            raise ValueError("tqe: TQE terms act around the weight quantizer; give a weight config too")
        if num_ranges < 1:
            raise ValueError(f"num_ranges: must be >= 1, got {num_ranges}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames: must be None or >= 1, got {num_frames}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.weight_cfg, self.act_cfg, self.tqe_cfg = weight_cfg, act_cfg, tqe
        self.num_frames, self.num_ranges = num_frames, num_ranges
        self.step_bits = tuple((int(low), int(high), w, a) for low, high, w, a in step_bits)
        for low, high, w, a in self.step_bits:
            if (w is not None and weight_cfg is None) or (a is not None and act_cfg is None):
                raise ValueError(f"step_bits: plan steps {high}-{low} quantize weights/activations that have no config")
        self.w_bits = weight_cfg.bits if weight_cfg else None  # bits in use; None = floating point
        self.a_bits = act_cfg.bits if act_cfg else None

        self.weight_quantizer = (
            None if weight_cfg is None
            else WeightQuantizer(weight_cfg, self.out_features, self.in_features, num_ranges)
        )
        other_widths = sorted({w for _, _, w, _ in self.step_bits if w is not None} - {self.w_bits})
        self.step_weight_quantizers = nn.ModuleDict({
            str(bits): WeightQuantizer(dataclasses.replace(weight_cfg, bits=bits), self.out_features,
                                       self.in_features, num_ranges)
            for bits in other_widths
        })
        if act_cfg is None:
            self.act_quantizer = None
        elif act_cfg.format == "fp8_e4m3":
            self.act_quantizer = FP8ActQuantizer(act_cfg)
        elif act_cfg.mode == "dynamic_per_token":
            self.act_quantizer = DynamicActQuantizer(act_cfg)
        else:
            self.act_quantizer = StaticActQuantizer(act_cfg, num_ranges)

        rank = tqe.rank if tqe is not None else 0
        rank_out = tqe.rank_out if tqe is not None else 0
        self.lora_a = _kaiming_uniform(rank, self.in_features) if rank else None  # [r, d_in]
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank)) if rank else None  # [d_out, r]
        self.lora_a_out = _kaiming_uniform(rank_out, self.in_features) if rank_out else None
        self.lora_b_out = nn.Parameter(torch.zeros(self.out_features, rank_out)) if rank_out else None
        use_frame_scale = num_frames is not None and rank_out > 0 and tqe.frame_scale
        self.frame_scale = nn.Parameter(torch.ones(1, num_frames, 1)) if use_frame_scale else None

        self.register_buffer("smooth_scale", None)  # [R or 1, d_in] once set
        self.register_buffer("rotate", torch.tensor(False))  # persisted flag; mirrored in _rotate
        self._rotate = False
        # Regenerated by the balancing code (d_in² per layer is too large to store per layer).
        self.register_buffer("rotation", None, persistent=False)  # [d_in, d_in] once set
        # One range keeps [d_in] and a scalar count: the layout of files saved before ranges had statistics.
        stats_shape = () if num_ranges == 1 else (num_ranges,)
        self.register_buffer("act_absmax", torch.zeros(*stats_shape, self.in_features))
        self.register_buffer("act_stats_count", torch.zeros(stats_shape, dtype=torch.long))
        self.register_buffer("folded_weight", None)  # [R, d_out, d_in] after fold()

        self.quant_weight = False
        self.quant_act = False
        self.range_index = 0
        self.observe_act_stats = False
        self.act_stats_momentum = 0.95
        self.to(weight.device)  # new parameters/buffers follow the weight; the weight is not copied

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight: WeightQuantConfig | None,
        act: ActQuantConfig | None,
        tqe: TQEConfig | None = None,
        num_frames: int | None = None,
        num_ranges: int = 1,
        step_bits: tuple = (),
    ) -> "QuantLinear":
        """Wrap `linear` (its weight/bias tensors are shared, not copied)."""
        return cls(linear.weight, linear.bias, weight, act, tqe, num_frames, num_ranges, step_bits)

    # ----------------------------------------------------------------- external setters
    def set_range_index(self, index: int) -> None:
        """Select the timestep range whose quantizer ranges / smoothing scales are used."""
        if not 0 <= index < self.num_ranges:
            raise ValueError(f"range_index: must be in 0..{self.num_ranges - 1}, got {index}")
        self.range_index = index

    def plan_segment(self, plan_step: int) -> int | None:
        """Index of the `step_bits` interval holding `plan_step`, or None."""
        for index, (low, high, _, _) in enumerate(self.step_bits):
            if low <= plan_step <= high:
                return index
        return None

    def select_plan_step(self, plan_step: int) -> None:
        """Use the bits `step_bits` gives at `plan_step`; ValueError when no interval holds it."""
        index = self.plan_segment(plan_step)
        if index is None:
            spans = [f"{high}-{low}" for low, high, _, _ in self.step_bits]
            raise ValueError(f"plan step {plan_step} is in no timestep range of the bit plan (ranges {spans})")
        self.w_bits, self.a_bits = self.step_bits[index][2:]

    @property
    def weight_bit_widths(self) -> tuple[int, ...]:
        """Every weight width this layer quantizes at (its config's first); () without weight quantizer."""
        if self.weight_quantizer is None:
            return ()
        return (self.weight_cfg.bits, *(int(bits) for bits in self.step_weight_quantizers))

    def _weight_quantizer_for(self, bits: int | None) -> WeightQuantizer:
        if bits is None or bits == self.weight_cfg.bits:
            return self.weight_quantizer
        return self.step_weight_quantizers[str(bits)]

    def set_balance(self, smooth_scale: torch.Tensor | None = None, rotation: torch.Tensor | None = None) -> None:
        """Install channel balancing (None removes that part).

        Args:
            smooth_scale: s [d_in] or [R, d_in] (one row per timestep range), positive.
            rotation: H [d_in, d_in], orthonormal (not checked), e.g. a normalised Hadamard.
        Call before the first quantized forward: the weight quantizer is initialised on W'.
        """
        if self.folded_weight is not None:
            raise RuntimeError("set_balance: the layer is folded; balancing is baked into its weight")
        if smooth_scale is not None:
            if smooth_scale.dim() == 1:
                smooth_scale = smooth_scale[None]
            if smooth_scale.shape[-1] != self.in_features or smooth_scale.shape[0] not in (1, self.num_ranges):
                raise ValueError(
                    f"smooth_scale: expected [{self.in_features}] or [{self.num_ranges}, {self.in_features}], "
                    f"got {tuple(smooth_scale.shape)}"
                )
            smooth_scale = smooth_scale.detach().to(device=self.weight.device, dtype=torch.float32)
        if rotation is not None:
            if tuple(rotation.shape) != (self.in_features, self.in_features):
                raise ValueError(
                    f"rotation: expected [{self.in_features}, {self.in_features}], got {tuple(rotation.shape)}"
                )
            rotation = rotation.detach().to(device=self.weight.device, dtype=torch.float32)
        self.smooth_scale = smooth_scale
        self.rotation = rotation
        self.rotate.fill_(rotation is not None)
        self._rotate = rotation is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # smooth_scale only exists once set; give a fresh layer a slot of the saved shape.
        key = prefix + "smooth_scale"
        if key in state_dict and self.smooth_scale is None:
            self.smooth_scale = torch.empty_like(state_dict[key], device=self.act_absmax.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rotate = bool(self.rotate)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Optimiser groups: 'tqe' (lora_*, frame_scale) and 'delta' (every weight quantizer's Δ)."""
        tqe = [p for p in (self.lora_a, self.lora_b, self.lora_a_out, self.lora_b_out, self.frame_scale) if p is not None]
        quantizers = [self._weight_quantizer_for(bits) for bits in self.weight_bit_widths]
        delta = [q.delta for q in quantizers if q.delta.requires_grad]
        return {"tqe": tqe, "delta": delta}

    # ----------------------------------------------------------------- weight paths
    def _smooth_scale(self, range_index: int) -> torch.Tensor | None:
        if self.smooth_scale is None:
            return None
        return self.smooth_scale[range_index if self.smooth_scale.shape[0] > 1 else 0]  # [d_in]

    def _rotation(self) -> torch.Tensor | None:
        if not self._rotate:
            return None
        if self.rotation is None:
            raise RuntimeError("rotate is set but no rotation matrix is installed: call set_balance(rotation=H)")
        return self.rotation

    def balanced_weight(self, range_index: int | None = None) -> torch.Tensor:
        """W' = (W · s) · H in fp32 -> [d_out, d_in] (W itself without balancing)."""
        range_index = self.range_index if range_index is None else range_index
        weight = self.weight.float()
        scale, rotation = self._smooth_scale(range_index), self._rotation()
        if scale is not None:
            weight = weight * scale
        if rotation is not None:
            weight = weight @ rotation
        return weight

    def _post_weight(self) -> torch.Tensor | None:
        """B_out · A_out [d_out, d_in], or None without the post-quantizer term."""
        if self.lora_b_out is None:
            return None
        if self.lora_b_out.shape[1] == 1:  # rank 1 (the reference's): an exact fp32 outer product, never TF32
            return self.lora_b_out * self.lora_a_out
        return self.lora_b_out @ self.lora_a_out

    def effective_weight(self, range_index: int | None = None, out_dtype: torch.dtype = torch.float32,
                         bits: int | None = None) -> torch.Tensor:
        """W_eff = Q_w(W' + B·A) + B_out·A_out, computed in fp32, returned in `out_dtype` -> [d_out, d_in].

        bits: the weight width (one of `weight_bit_widths`); default the width in use (the config's
        at a floating-point step). Without autograd on a CUDA weight the elementwise chain runs as one
        fused Triton pass (`qdiff.kernels.weight_quant`), equal to the eager ops bit for bit.
        """
        if self.weight_quantizer is None:
            raise RuntimeError("effective_weight: this layer has no weight quantizer")
        range_index = self.range_index if range_index is None else range_index
        quantizer = self._weight_quantizer_for(self.w_bits if bits is None else bits)
        if (self.weight.is_cuda and not quantizer.fp8 and quantizer.is_initialized(range_index)
                and not self._tracks_grad()):  # (FP8 weights: the eager ops, a cast the GPU does natively)
            return self._fused_effective_weight(range_index, out_dtype, quantizer)
        return self._eager_effective_weight(range_index, quantizer).to(out_dtype)

    def _tracks_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(p.requires_grad for p in self.parameters())

    def _fused_effective_weight(self, range_index: int, out_dtype: torch.dtype, quantizer: WeightQuantizer) -> torch.Tensor:
        smooth, weight = self._smooth_scale(range_index), self.weight
        if self._rotation() is not None:  # W' = (W·s)·H is a GEMM: form it first, then fuse the rest
            smooth, weight = None, self.balanced_weight(range_index)
        low_rank = None if self.lora_a is None else self.lora_b @ self.lora_a
        post = None
        if self.lora_b_out is not None:
            rank1 = self.lora_b_out.shape[1] == 1
            post = (self.lora_b_out, self.lora_a_out) if rank1 else self._post_weight()
        groups = quantizer.num_groups
        return fake_quant_weight(
            weight, quantizer.delta[range_index].reshape(-1, groups), quantizer.zero_point[range_index].reshape(-1, groups),
            quantizer.cfg.bits, quantizer.cfg.symmetric, smooth=smooth, low_rank=low_rank, post=post, out_dtype=out_dtype,
        )

    def _eager_effective_weight(self, range_index: int, quantizer: WeightQuantizer) -> torch.Tensor:
        weight = self.balanced_weight(range_index)
        if self.lora_a is not None:
            weight = weight + self.lora_b @ self.lora_a
        weight = quantizer(weight, range_index)
        post = self._post_weight()
        return weight if post is None else weight + post

    # ----------------------------------------------------------------- forward
    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        # Reference statistic: per-sample channel max over the token axis, averaged over samples.
        batch_absmax = x.detach().abs().amax(dim=-2).reshape(-1, self.in_features).float().mean(dim=0)
        stats = self.act_absmax.view(self.num_ranges, -1)[self.range_index]  # views: written in place
        count = self.act_stats_count.view(-1)[self.range_index]
        if int(count) == 0:
            stats.copy_(batch_absmax)
        else:
            stats.mul_(self.act_stats_momentum).add_(batch_absmax, alpha=1 - self.act_stats_momentum)
        count += 1

    def _balance_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> x' = (x / s) · H [..., d_in]."""
        scale, rotation = self._smooth_scale(self.range_index), self._rotation()
        if scale is not None:
            x = x / scale.to(x.dtype)
        if rotation is not None:
            x = x @ rotation.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] (temporal layers: [B·S, T, d_in]) -> y [..., d_out]."""
        if self.frame_scale is not None and x.shape[-2] != self.num_frames:
            raise ValueError(f"temporal layer expects x [B*S, {self.num_frames}, d_in], got {tuple(x.shape)}")
        if self.observe_act_stats:
            self._observe(x)
        x = self._balance_input(x)
        if self.quant_act and self.act_quantizer is not None and self.a_bits is not None:
            x = self.act_quantizer(x, self.range_index, self.a_bits)

        folded = self.folded_weight is not None
        quantize_weight = self.quant_weight and self.weight_quantizer is not None and self.w_bits is not None
        if folded:
            weight = self.folded_weight[self.range_index if self.folded_weight.shape[0] > 1 else 0]
        elif quantize_weight:
            weight = self.effective_weight(out_dtype=x.dtype)
        elif self.smooth_scale is not None or self._rotate:
            weight = self.balanced_weight()
        else:
            weight = self.weight
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, weight.to(x.dtype), bias)

        if self.frame_scale is not None and (folded or quantize_weight):
            # one fused pass; under torch.compile the eager ops below, which the compiler fuses itself
            if (y.is_cuda and self.lora_a_out.shape[0] == 1 and not self._tracks_grad()
                    and not torch.compiler.is_compiling()):
                return frame_rank1_update_(y, x, self.lora_a_out, self.lora_b_out, self.frame_scale)
            # m_t · x·(B_out·A_out)ᵀ: scale the rank-r_out projection per frame while it is small
            # ([B*S, T, d_in] -> [B*S, T, r_out] · m [1, T, 1]), then add it in one rank-r_out update of y.
            low = F.linear(x, self.lora_a_out.to(x.dtype)) * self.frame_scale.to(x.dtype)
            y = torch.addmm(y.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]),
                            self.lora_b_out.to(x.dtype).t()).reshape(y.shape)
        return y

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def fold(self) -> None:
        """Bake W_eff of every timestep range into `folded_weight` [R, d_out, d_in] (the weight's dtype).

        Drops the original weight, the weight quantizer and the TQE parameters. What stays:
        bias, the online activation transform (s, H) and activation quantizer, and, for temporal
        layers, the post term B_out, A_out and m as frozen buffers (its per-frame scaling cannot
        be folded into one weight). Needs `quant_weight` on, as the folded forward quantizes.
        """
        if self.folded_weight is not None:
            return
        if self.weight_quantizer is None or not self.quant_weight:
            raise RuntimeError("fold: needs a weight quantizer with quant_weight=True")
        if self.step_bits:
            raise RuntimeError("fold: the layer's bits change per timestep (step_bits); a folded layer keeps one "
                               "weight per timestep range, so per-timestep bits cannot be folded")
        # Stored in the layer's dtype: the forward casts to x's dtype anyway, so a bf16 model keeps
        # bf16 weights (half the memory of fp32, and no per-forward cast).
        weights = torch.stack([self.effective_weight(r, out_dtype=self.weight.dtype) for r in range(self.num_ranges)])
        if all(torch.equal(weights[0], other) for other in weights[1:]):
            weights = weights[:1]  # ranges share one weight: store it once
        kept = {}
        if self.frame_scale is not None:
            kept = {name: getattr(self, name).detach().clone() for name in ("lora_a_out", "lora_b_out", "frame_scale")}
        for name in ("weight", "lora_a", "lora_b", "lora_a_out", "lora_b_out", "frame_scale"):
            delattr(self, name)
            if name in kept:
                self.register_buffer(name, kept[name])
            else:
                setattr(self, name, None)
        self.weight_quantizer = None
        self.folded_weight = weights

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"bias={self.bias is not None}"]
        parts.append(f"w_bits={self.weight_cfg.bits if self.weight_cfg else None}")
        parts.append(f"a_bits={self.act_cfg.bits if self.act_cfg else None}")
        if self.weight_cfg is not None and "fp8_e4m3" in (self.weight_cfg.quant_format, self.weight_cfg.format_8bit):
            parts.append(f"w_format={self.weight_cfg.quant_format}")
        if self.act_cfg is not None and self.act_cfg.format != "int":
            parts.append(f"a_format={self.act_cfg.format}")
        if self.tqe_cfg is not None:
            parts.append(f"tqe_rank={self.tqe_cfg.rank}/{self.tqe_cfg.rank_out}")
        if self.num_frames is not None:
            parts.append(f"num_frames={self.num_frames}")
        if self.num_ranges > 1:
            parts.append(f"num_ranges={self.num_ranges}")
        if self.step_bits:
            parts.append(f"step_bits={[list(segment) for segment in self.step_bits]}")
        parts.append(f"quant_weight={self.quant_weight}, quant_act={self.quant_act}")
        if self.folded_weight is not None:
            parts.append("folded=True")
        return ", ".join(parts)
