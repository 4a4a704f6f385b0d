"""Per-layer quantizer configs: frozen dataclasses validated at construction.

Each config round-trips through plain dicts (`to_dict` / `from_dict`) so YAML files map onto
them one to one; unknown keys and out-of-range values raise `ValueError` naming the field.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

_Config = TypeVar("_Config")

_MIN_BITS, _MAX_BITS = 2, 8
# Number formats of a quantized tensor: "int" (a uniform integer grid, the papers' quantizers) or "fp8_e4m3"
# (per-row absmax scale and torch's cast to float8_e4m3fn; qdiff.kernels.fp8_quant). Kept in sync with
# qdiff.kernels.fp8_quant.FORMATS (not imported here: this module stays free of torch).
FORMATS = ("int", "fp8_e4m3")
FP8 = "fp8_e4m3"


def _check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"{name}: must be an int in {_MIN_BITS}..{_MAX_BITS}, got {bits!r}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be a bool (true/false), got {value!r}")


class _DictMixin:
    """`to_dict` / `from_dict` for flat frozen dataclasses; unknown keys are errors.

    Keys listed in `_OMIT_AT_DEFAULT` are left out of `to_dict` while they hold their default, so configs that do
    not use a newer key serialise exactly as before it existed (files' headers compare these dicts)."""

    _OMIT_AT_DEFAULT: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for key in self._OMIT_AT_DEFAULT:
            if data[key] == defaults[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls: type[_Config], d: Mapping[str, Any]) -> _Config:
        known = {field.name for field in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(
                    f"{cls.__name__}: unknown key {key!r}; allowed keys are {sorted(known)}"
                )
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig(_DictMixin):
    """Uniform fake quantization of a linear weight [d_out, d_in].

    bits: 2..8.
    symmetric: signed range [-2^(b-1), 2^(b-1)-1] with zero point 0; else affine [0, 2^b-1].
    group_size: None = one range per output channel (the papers' setting); else ranges per
        group of `group_size` consecutive input channels (d_in must be divisible by it).
    init: "grid_search_lp" (the reference's clipping search, METHOD.md §3) or "min_max".
    learnable_delta: Δ is a trainable parameter during distillation (zero point stays fixed).
    format: "int" (the integer grid above) or "fp8_e4m3": per-output-channel scale Δ = absmax/448 and torch's
        cast to float8_e4m3fn (needs bits 8 and group_size None; `symmetric` and `init` do not apply: the scale
        is the absmax, no zero point, no search). Δ stays learnable (straight-through), as on the integer grid.
    format_8bit: the format of layers whose weight width resolves to 8 bits (a mixed-precision map's W8
        layers in a W4 config); None = `format`. "fp8_e4m3" makes a W4A8 config's 8-bit MLP weights FP8.
    """

    bits: int = 8
    symmetric: bool = False
    group_size: int | None = None
    init: str = "grid_search_lp"
    learnable_delta: bool = True
    format: str = "int"
    format_8bit: str | None = None

    _OMIT_AT_DEFAULT = ("format", "format_8bit")

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bool("symmetric", self.symmetric)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size: must be None or a positive int, got {self.group_size!r}")
        _check_choice("init", self.init, ("grid_search_lp", "min_max"))
        _check_bool("learnable_delta", self.learnable_delta)
        _check_choice("format", self.format, FORMATS)
        if self.format_8bit is not None:
            _check_choice("format_8bit", self.format_8bit, FORMATS)
        if self.format == FP8:
            if self.bits != 8:
                raise ValueError(f"bits: format 'fp8_e4m3' weights are 8-bit, got bits={self.bits} (for 4-bit integer "
                                 "weights in an FP8 config use format: int, and format_8bit: fp8_e4m3 for its W8 layers)")
            if self.format_8bit == "int":
                raise ValueError("format_8bit: 'int' contradicts format 'fp8_e4m3' (every layer is 8-bit here)")
        if FP8 in (self.format, self.format_8bit) and self.group_size is not None:
            raise ValueError(f"group_size: FP8 weights have one scale per output channel (the FP8 GEMM's row-wise "
                             f"scales), got group_size={self.group_size}")

    @property
    def quant_format(self) -> str:
        """The format this config quantizes with at its own `bits`: `format_8bit` at 8 bits when set, else `format`."""
        if self.bits == 8 and self.format_8bit is not None:
            return self.format_8bit
        return self.format


@dataclasses.dataclass(frozen=True)
class ActQuantConfig(_DictMixin):
    """Fake quantization of a linear layer's input activations [..., d_in].

    bits: 2..8.
    symmetric: signed range with zero point 0; else affine min-max.
    mode: "dynamic_per_token" (range of every token row computed at run time) or
        "static_per_tensor" (one calibrated range per timestep range; naive PTQ baseline).
    reference_token_grouping: reproduce the reference's dynamic grouping of one token position
        across the batch and its all-Δ epsilon quirk (METHOD.md §3, parity runs only).
    format: "int" (the integer grid above) or "fp8_e4m3": every token row scaled by its absmax/448 and cast to
        float8_e4m3fn (needs bits 8 and mode 'dynamic_per_token'; `symmetric` does not apply: FP8 has no zero
        point). Not the papers' quantizer: the activation side of the FP8 GEMM path (docs/int_kernels.md).
    """

    bits: int = 8
    symmetric: bool = False
    mode: str = "dynamic_per_token"
    reference_token_grouping: bool = False
    format: str = "int"

    _OMIT_AT_DEFAULT = ("format",)

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bool("symmetric", self.symmetric)
        _check_choice("mode", self.mode, ("dynamic_per_token", "static_per_tensor"))
        _check_bool("reference_token_grouping", self.reference_token_grouping)
        if self.reference_token_grouping and self.mode != "dynamic_per_token":
            raise ValueError(
                "reference_token_grouping: only valid with mode='dynamic_per_token', "
                f"got mode={self.mode!r}"
            )
        _check_choice("format", self.format, FORMATS)
        if self.format == FP8:
            if self.bits != 8:
                raise ValueError(f"bits: format 'fp8_e4m3' activations are 8-bit, got bits={self.bits}")
            if self.mode != "dynamic_per_token":
                raise ValueError(f"mode: format 'fp8_e4m3' supports 'dynamic_per_token' only (a scale per token row "
                                 f"at run time), got {self.mode!r}")
            if self.reference_token_grouping:
                raise ValueError("reference_token_grouping: a parity switch of the integer quantizer; format "
                                 "'fp8_e4m3' scales each token row on its own")


@dataclasses.dataclass(frozen=True)
class TQEConfig(_DictMixin):
    """Token-aware Quantization Estimator terms around the weight quantizer (METHOD.md §4).

    rank: rank r of B·A added before the weight quantizer (0 disables it); paper: 32.
    rank_out: rank of B_out·A_out added after the quantizer (0 disables it); paper: 1.
    frame_scale: temporal layers get a learnable per-frame weight m [1, T, 1] on the post term.
    """

    rank: int = 32
    rank_out: int = 1
    frame_scale: bool = True

    def __post_init__(self) -> None:
        for name in ("rank", "rank_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
        _check_bool("frame_scale", self.frame_scale)


@dataclasses.dataclass(frozen=True)
class BalanceConfig(_DictMixin):
    """Channel balancing before quantization (METHOD.md §6).

    method: "none", "smooth" (SmoothQuant scaling s = max|X|^α / max|W|^(1-α)), "rotate"
        (online Hadamard rotation of the input channels) or "smooth_rotate" (both).
    alpha: migration strength α in [0, 1] (Q-VDiT W3A8/W4A8: 0.11).
    momentum: running average weight of the per-batch channel max statistic, in [0, 1).
    """

    method: str = "none"
    alpha: float = 0.5
    momentum: float = 0.95

    def __post_init__(self) -> None:
        _check_choice("method", self.method, ("none", "smooth", "rotate", "smooth_rotate"))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be a float in [0, 1], got {self.alpha!r}")
        if (
            isinstance(self.momentum, bool)
            or not isinstance(self.momentum, (int, float))
            or not 0.0 <= self.momentum < 1.0
        ):
            raise ValueError(f"momentum: must be a float in [0, 1), got {self.momentum!r}")
