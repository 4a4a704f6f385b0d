"""The quantization run config: one YAML file -> frozen, validated dataclasses.

    cfg = QuantConfig.from_yaml("configs/quant/w4a8_qvdit.yaml")    # raises on bad keys
    cfg = apply_overrides(cfg, ["distill.iterations=10", "act.bits=6"])
    w_bits, a_bits = cfg.resolve_bits("blocks.0.mlp.fc1")           # None = floating point

Every error names the key path (`distill.lr: expected a positive float, got 'abc'`) and,
for unknown keys, lists the allowed ones. File paths inside a YAML resolve relative to the
YAML's directory first, then to the working directory; `to_dict()` holds them absolute.
The schema is documented in docs/configs.md; the per-layer quantizer configs live in
`qdiff.quantizers.config`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from qdiff.mixed_precision.plan import FP_BITS, BitPlan, is_fp, load_bit_plan, load_fp_layers
from qdiff.quantizers.config import ActQuantConfig, BalanceConfig, TQEConfig, WeightQuantConfig

__all__ = [
    "METHODS",
    "CalibConfig",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DistillConfig",
    "MixedPrecisionConfig",
    "QuantConfig",
    "apply_overrides",
]

METHODS = ("ptq", "smoothquant", "quarot", "viditq", "qvdit")


class ConfigError(ValueError):
    """A config value, key or shape is invalid; the message names the key path."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A file named in a config does not exist; the message names the config and the file."""


# ---------------------------------------------------------------------------------------------
# Field checkers: each takes (key, value), returns the (coerced) value or raises ConfigError.
# ---------------------------------------------------------------------------------------------


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    return value


def _integer(minimum: int) -> Callable[[str, Any], int]:
    describe = "a positive int" if minimum == 1 else f"an int >= {minimum}"

    def check(key: str, value: Any) -> int:
        number = value
        if isinstance(value, str):  # CLI text, or PyYAML's reading of `1.5e4`
            try:
                number = float(value.strip())
            except ValueError:
                number = value
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            raise ConfigError(f"{key}: expected {describe}, got {value!r}")
        return number

    return check


def _real(positive: bool) -> Callable[[str, Any], float]:
    describe = "a positive float" if positive else "a float >= 0"

    def check(key: str, value: Any) -> float:
        number = value
        if isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                number = value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected {describe}, got {value!r}")
        number = float(number)
        if number != number or (number <= 0 if positive else number < 0):
            raise ConfigError(f"{key}: expected {describe}, got {value!r}")
        return number

    return check


def _fraction(key: str, value: Any) -> float:
    """A float in (0, 1]."""
    number = _real(positive=True)(key, value)
    if number > 1:
        raise ConfigError(f"{key}: expected a fraction in (0, 1], got {value!r}")
    return number


def _boolean_or_auto(key: str, value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true, false or auto, got {value!r}")


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
        return value

    return check


def _count_or(*words: str) -> Callable[[str, Any], int | str]:
    """An int >= 0, or one of `words`."""
    count = _integer(0)

    def check(key: str, value: Any) -> int | str:
        if isinstance(value, str) and value in words:
            return value
        try:
            return count(key, value)
        except ConfigError:
            raise ConfigError(f"{key}: expected an int >= 0 or one of {list(words)}, got {value!r}") from None

    return check


def _optional_path(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, (str, Path)) or not str(value).strip()):
        raise ConfigError(f"{key}: expected a file path or null, got {value!r}")
    return None if value is None else str(value)


def _check_fields(obj: Any, checks: Mapping[str, Callable[[str, Any], Any]]) -> None:
    for name, check in checks.items():
        object.__setattr__(obj, name, check(name, getattr(obj, name)))


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig:
    """Per-layer bit maps (METHOD.md §3); see qdiff.mixed_precision.plan for the file format.

    weight_bits_file / act_bits_file: YAML maps {layer: bits}; null = uniform bits.
    weight_bits_apply_below: the weight map is used only when weight.bits <= this (reference: 4).
    act_bits_apply_below: the act map is used only when act.bits <= this (reference: 6).
    """

    weight_bits_file: str | None = None
    act_bits_file: str | None = None
    weight_bits_apply_below: int = 4
    act_bits_apply_below: int = 6

    def __post_init__(self) -> None:
        _check_fields(self, {
            "weight_bits_file": _optional_path,
            "act_bits_file": _optional_path,
            "weight_bits_apply_below": _integer(2),
            "act_bits_apply_below": _integer(2),
        })

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """TQE/TMD distillation against the FP model (METHOD.md §5)."""

    enabled: bool = False
    iterations: int = 10000
    batch_size: int = 4
    lr: float = 1e-5  # TQE terms and per-frame weights
    lr_delta: float = 1e-6  # weight quantizer step sizes
    tmd: bool = True  # add the temporal-relation KL term; false = plain MSE
    tmd_lambda: float = 100.0
    tmd_reference_layout: bool = False  # reference's reshape(B, T, -1) "frames" (parity only)
    quantize_activations: bool = False  # reference trains with FP activations
    grad_checkpointing: bool = True
    checkpoint_every: int = 500
    seed: int = 42
    weight_decay: float = 0.01  # AdamW default
    fp_targets: str = "precompute"  # FP outputs once per calibration row ("online": teacher every iteration)
    fused_weights: bool = False  # W_eff once per iteration, fused forward + STE backward (slower on an H100)
    checkpoint_blocks: int | str = "auto"  # blocks recomputed in backward: "auto" (fit memory), "all" or a count
    checkpoint_memory_fraction: float = 0.85  # "auto": share of the GPU memory available to the run a step may peak at
    compile: bool | str = "auto"  # torch.compile(dynamic=False) each checkpointable block ("auto": `compiles`)
    compile_memory_budget: float = 0.5  # with compile: the share of a block's activations its compiled graph saves
    keep_best: bool = True  # keep the PTQ initialisation when distillation ends worse on the eval rows

    def __post_init__(self) -> None:
        _check_fields(self, {
            "enabled": _boolean,
            "iterations": _integer(1),
            "batch_size": _integer(1),
            "lr": _real(positive=True),
            "lr_delta": _real(positive=False),
            "tmd": _boolean,
            "tmd_lambda": _real(positive=False),
            "tmd_reference_layout": _boolean,
            "quantize_activations": _boolean,
            "grad_checkpointing": _boolean,
            "checkpoint_every": _integer(1),
            "seed": _integer(0),
            "weight_decay": _real(positive=False),
            "fp_targets": _choice("precompute", "online"),
            "fused_weights": _boolean,
            "checkpoint_blocks": _count_or("auto", "all"),
            "checkpoint_memory_fraction": _fraction,
            "compile": _boolean_or_auto,
            "compile_memory_budget": _fraction,
            "keep_best": _boolean,
        })

    def compiles(self, device: torch.device | str) -> bool:
        """Whether a run on `device` compiles its blocks: `compile` when it is true or false; "auto" (the default):
        on CUDA for runs of at least `AUTO_COMPILE_ITERATIONS` (1,000) iterations, where the minute or two of
        compiling pays back (STDiT-XL/2 W3A6 on an H100, one process: 0.971 instead of 1.623 s per iteration); never
        on CPU."""
        if self.compile != "auto":
            return bool(self.compile)
        return torch.device(device).type == "cuda" and self.iterations >= AUTO_COMPILE_ITERATIONS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


AUTO_COMPILE_ITERATIONS = 1000  # distill.compile "auto": the shortest run that compiles


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Which calibration data the run uses (METHOD.md §5).

    n_steps: sampling steps used, subsampled evenly from the stored trajectory (100 = all).
    n_prompts: prompts of the calibration set.
    timestep_ranges: number of timestep ranges with separate static statistics (1 = one set).
    """

    n_steps: int = 100
    n_prompts: int = 10
    timestep_ranges: int = 1

    def __post_init__(self) -> None:
        _check_fields(self, {
            "n_steps": _integer(1),
            "n_prompts": _integer(1),
            "timestep_ranges": _integer(1),
        })

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# section name -> (config class, may be null)
_SECTIONS: dict[str, tuple[type, bool]] = {
    "weight": (WeightQuantConfig, False),
    "act": (ActQuantConfig, False),
    "tqe": (TQEConfig, True),
    "balance": (BalanceConfig, False),
    "mixed_precision": (MixedPrecisionConfig, False),
    "distill": (DistillConfig, False),
    "calib": (CalibConfig, False),
}
_PATH_KEYS = {("mixed_precision", "weight_bits_file"), ("mixed_precision", "act_bits_file"), ("fp_layers_file",)}


def _allowed_keys(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls) if field.init]


def _build_section(name: str, value: Any) -> Any:
    cls, nullable = _SECTIONS[name]
    if value is None and nullable:
        return None
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        allowed = "a mapping or null" if nullable else "a mapping"
        raise ConfigError(f"{name}: expected {allowed} with keys {_allowed_keys(cls)}, got {value!r}")
    allowed = _allowed_keys(cls)
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys are {allowed}")
    try:
        return cls(**dict(value))
    except ConfigError as error:
        raise ConfigError(f"{name}.{error}") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{name}.{error}") from None


def _resolve_path(key: str, value: Any, base_dirs: Sequence[Path], source: str | None) -> str | None:
    value = _optional_path(key, value)
    if value is None:
        return None
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in base_dirs]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    where = f"{source}: " if source else ""
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise ConfigFileNotFoundError(f"{where}{key}: file not found: {value!r} (looked in {looked})")


# ---------------------------------------------------------------------------------------------
# QuantConfig
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A whole quantization run: method, quantizers, balancing, mixed precision, distillation.

    method: "ptq" | "smoothquant" | "quarot" | "viditq" | "qvdit" (the algorithm family; the
        sections below say exactly what runs).
    fp_layers_file / fp_layers: module-path prefixes kept in floating point (file and list
        are combined).
    """

    method: str = "ptq"
    weight: WeightQuantConfig = dataclasses.field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = dataclasses.field(default_factory=ActQuantConfig)
    tqe: TQEConfig | None = None
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    mixed_precision: MixedPrecisionConfig = dataclasses.field(default_factory=MixedPrecisionConfig)
    fp_layers_file: str | None = None
    fp_layers: tuple[str, ...] = ()
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)

    # Loaded from the files above in __post_init__ (not part of the schema).
    resolved_fp_layers: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False, default=())
    weight_plan: BitPlan | None = dataclasses.field(init=False, repr=False, compare=False, default=None)
    act_plan: BitPlan | None = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        for name in _SECTIONS:
            object.__setattr__(self, name, _build_section(name, getattr(self, name)))
        if self.method == "smoothquant" and self.balance.method != "smooth":
            raise ConfigError(f"balance.method: method 'smoothquant' needs 'smooth', got {self.balance.method!r}")
        if self.method == "quarot" and self.balance.method != "rotate":
            raise ConfigError(f"balance.method: method 'quarot' needs 'rotate', got {self.balance.method!r}")

        object.__setattr__(self, "fp_layers_file", _optional_path("fp_layers_file", self.fp_layers_file))
        fp_layers = self.fp_layers
        if isinstance(fp_layers, str) or not isinstance(fp_layers, (list, tuple)) or not all(
            isinstance(entry, str) and entry.strip() for entry in fp_layers
        ):
            raise ConfigError(f"fp_layers: expected a list of module-path prefixes, got {fp_layers!r}")
        object.__setattr__(self, "fp_layers", tuple(entry.strip() for entry in fp_layers))

        try:
            from_file = load_fp_layers(self.fp_layers_file) if self.fp_layers_file else ()
            mixed = self.mixed_precision
            weight_plan = (
                load_bit_plan(mixed.weight_bits_file, self.weight.bits) if mixed.weight_bits_file else None
            )
            act_plan = load_bit_plan(mixed.act_bits_file, self.act.bits) if mixed.act_bits_file else None
        except FileNotFoundError as error:
            raise ConfigFileNotFoundError(str(error)) from None
        except ValueError as error:
            raise ConfigError(str(error)) from None
        object.__setattr__(self, "resolved_fp_layers", tuple(dict.fromkeys(from_file + self.fp_layers)))
        object.__setattr__(self, "weight_plan", weight_plan)
        object.__setattr__(self, "act_plan", act_plan)
        self._check_fp8_plans()

    def _check_fp8_plans(self) -> None:
        """FP8 weights/activations have one width (8): a bit map that applies to them would ask for other widths."""
        plans = self.applied_plans()
        if self.act.format == "fp8_e4m3" and "act" in plans:
            raise ConfigError("mixed_precision.act_bits_file: act.format 'fp8_e4m3' is 8-bit only, but the act map "
                              f"applies (act.bits {self.act.bits} <= act_bits_apply_below "
                              f"{self.mixed_precision.act_bits_apply_below}); drop the map or lower the threshold")
        if self.weight.format == "fp8_e4m3" and "weight" in plans:
            raise ConfigError("mixed_precision.weight_bits_file: weight.format 'fp8_e4m3' is 8-bit only, but the weight "
                              f"map applies (weight.bits {self.weight.bits} <= weight_bits_apply_below "
                              f"{self.mixed_precision.weight_bits_apply_below}); for W4/W8 mixed precision use "
                              "weight.format 'int' with weight.format_8bit 'fp8_e4m3'")

    # --- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], base_dir: str | Path | None = None, source: str | None = None
    ) -> "QuantConfig":
        """Build from a plain mapping. Relative file paths resolve against `base_dir` (if
        given), then the working directory; `source` names the origin in error messages."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}expected a mapping at the top level, got {type(data).__name__}")
        allowed = _allowed_keys(cls)
        for key in data:
            if key not in allowed:
                raise ConfigError(f"{where}{key}: unknown key; allowed keys are {allowed}")
        base_dirs = ([Path(base_dir)] if base_dir is not None else []) + [Path.cwd()]
        values = dict(data)
        try:
            if "mixed_precision" in values and isinstance(values["mixed_precision"], Mapping):
                mixed = dict(values["mixed_precision"])
                for key in ("weight_bits_file", "act_bits_file"):
                    if key in mixed:
                        mixed[key] = _resolve_path(f"mixed_precision.{key}", mixed[key], base_dirs, source)
                values["mixed_precision"] = mixed
            if "fp_layers_file" in values:
                values["fp_layers_file"] = _resolve_path("fp_layers_file", values["fp_layers_file"], base_dirs, source)
            return cls(**values)
        except ConfigFileNotFoundError:
            raise
        except ConfigError as error:
            raise ConfigError(f"{where}{error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "QuantConfig":
        """Load and validate a YAML config; errors name the file and the key path."""
        path = Path(path)
        if not path.is_file():
            raise ConfigFileNotFoundError(f"quant config not found: {path}")
        with open(path) as handle:
            try:
                data = yaml.safe_load(handle)
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: invalid YAML: {error}") from None
        return cls.from_dict({} if data is None else data, base_dir=path.resolve().parent, source=str(path))

    # --- saving / editing --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-able plain data (absolute file paths; `fp_layers` lists
        every floating-point prefix, those from `fp_layers_file` included)."""
        return {
            "method": self.method,
            "weight": self.weight.to_dict(),
            "act": self.act.to_dict(),
            "tqe": None if self.tqe is None else self.tqe.to_dict(),
            "balance": self.balance.to_dict(),
            "mixed_precision": self.mixed_precision.to_dict(),
            "fp_layers_file": self.fp_layers_file,
            "fp_layers": list(self.resolved_fp_layers),
            "distill": self.distill.to_dict(),
            "calib": self.calib.to_dict(),
        }

    def replace(self, **overrides: Any) -> "QuantConfig":
        """A copy with top-level fields replaced (sections as dataclasses or mappings)."""
        return dataclasses.replace(self, **overrides)

    # --- queries ------------------------------------------------------------------------------

    def is_fp(self, layer_name: str) -> bool:
        """True if `layer_name` lies inside a floating-point prefix."""
        return is_fp(layer_name, self.resolved_fp_layers)

    def applied_plans(self) -> dict[str, BitPlan]:
        """The mixed-precision maps in use: {'weight': plan, 'act': plan}, each present only when its
        file is set and the base bits are at or below its `*_apply_below` threshold."""
        mixed, plans = self.mixed_precision, {}
        if self.weight_plan is not None and self.weight.bits <= mixed.weight_bits_apply_below:
            plans["weight"] = self.weight_plan
        if self.act_plan is not None and self.act.bits <= mixed.act_bits_apply_below:
            plans["act"] = self.act_plan
        return plans

    def resolve_bits(self, layer_name: str, range_key: str | int | None = None) -> tuple[int | None, int | None]:
        """(weight bits, activation bits) of a linear layer; None = keep in floating point.

        FP layers give (None, None). Otherwise the base bits, replaced by the mixed-precision
        maps when the base is at or below their `*_apply_below` threshold (reference rule:
        weight map for W <= 4, act map for A <= 6). A map entry of 16/'fp' gives None.
        `range_key` selects the timestep range of per-range maps ('99-75' or a plan step, see
        `qdiff.mixed_precision.plan`); without it a per-range map gives its base bits (the
        config's), which apply outside sampling.
        """
        if self.is_fp(layer_name):
            return None, None
        bits = {"weight": self.weight.bits, "act": self.act.bits}
        for kind, plan in self.applied_plans().items():
            bits[kind] = plan.base_bits(layer_name) if range_key is None else plan.bits_for(layer_name, range_key)
        return tuple(None if b == FP_BITS else b for b in (bits["weight"], bits["act"]))

    def step_segments(self) -> tuple[tuple[int, int], ...]:
        """Plan-step intervals (low, high), ascending, on which every applied per-range map is constant.

        () when no applied map has timestep ranges. A step that some applied map's ranges do not
        hold lies in no segment.
        """
        plans = [plan for plan in self.applied_plans().values() if plan.range_overrides]
        if not plans:
            return ()
        segments: list[list[int]] = []
        last_keys = None
        for step in sorted(set.intersection(*(plan.range_steps() for plan in plans))):
            keys = tuple(plan.range_key_for_step(step) for plan in plans)
            if segments and keys == last_keys and segments[-1][1] == step - 1:
                segments[-1][1] = step
            else:
                segments.append([step, step])
            last_keys = keys
        return tuple((low, high) for low, high in segments)

    def check_step_segments(self, num_steps: int | None = None) -> None:
        """Raise ConfigError unless every applied per-range map holds exactly plan steps 0..num_steps−1
        (None: 0 up to the maps' last step, without gaps)."""
        plans = [plan for plan in self.applied_plans().values() if plan.range_overrides]
        if num_steps is None and plans:
            num_steps = max(max(plan.range_steps()) for plan in plans) + 1
        for plan in plans:
            covered = plan.range_steps()
            missing = sorted(set(range(num_steps)) - covered)
            if missing or max(covered) != num_steps - 1:
                raise ConfigError(
                    f"mixed_precision: {plan.source}: its timestep ranges hold plan steps {min(covered)}..{max(covered)} "
                    f"({len(covered)} steps); a {num_steps}-step sampler needs 0..{num_steps - 1}"
                    + (f"; steps {missing[:8]} are in no range" if missing else "")
                )

    def range_maps(self) -> dict[str, dict[str, dict[str, int]]]:
        """The applied per-range maps as plain data: {'weight'|'act': {'99-75': {layer: bits}}}."""
        return {
            kind: {key: dict(mapping) for key, mapping in plan.range_overrides.items()}
            for kind, plan in self.applied_plans().items() if plan.range_overrides
        }


# ---------------------------------------------------------------------------------------------
# CLI overrides
# ---------------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    body = text.strip()
    if body.startswith("--"):
        body = body[2:]
    if "=" not in body:
        raise ConfigError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. distill.iterations=10")
    key, raw = body.split("=", 1)
    parts = [part for part in key.strip().split(".")]
    if parts and parts[0] == "quant":  # `--quant.act.bits=6` as the CLI spells it
        parts = parts[1:]
    if not parts or any(not part for part in parts):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(cfg: QuantConfig, overrides: Sequence[str]) -> QuantConfig:
    """Apply dotted `KEY.PATH=VALUE` overrides (values parsed as YAML scalars, then validated
    like the file); returns a new config. A leading `--` and `quant.` are accepted."""
    data = cfg.to_dict()
    for text in overrides:
        parts, value = _parse_override(text)
        top_allowed = _allowed_keys(QuantConfig)
        head = parts[0]
        if head not in top_allowed:
            raise ConfigError(f"override {text!r}: {head}: unknown key; allowed keys are {top_allowed}")
        if len(parts) == 1:
            data[head] = value
            continue
        if head not in _SECTIONS or len(parts) > 2:
            raise ConfigError(f"override {text!r}: {'.'.join(parts)}: no such key")
        section_allowed = _allowed_keys(_SECTIONS[head][0])
        if parts[1] not in section_allowed:
            raise ConfigError(
                f"override {text!r}: {head}.{parts[1]}: unknown key; allowed keys are {section_allowed}"
            )
        section = data.get(head)
        section = {} if section is None else dict(section)  # e.g. tqe.rank=16 with tqe: null
        section[parts[1]] = value
        data[head] = section
    try:
        return QuantConfig.from_dict(data)
    except ConfigError as error:
        raise type(error)(f"override {list(overrides)}: {error}") from None
