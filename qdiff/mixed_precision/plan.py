"""Bit plans: which bit width each layer gets, read from the reference's file formats.

Two YAML shapes are accepted (METHOD.md §3):
- flat: `{layer.name: bits}` (Q-VDiT's `weight_*_mp.yaml`, `act_*_mp.yaml`);
- per timestep range: `{"99-75": {layer.name: bits}, ...}` (ViDiT-Q's `t20_*`/`t100_*`),
  keyed by sampling-step ranges "high-low" (inclusive). Steps count as the reference's sampling
  loop does ("plan steps"): N−1 at the first, noisiest step of an N-step sampler down to 0 at the
  last, so sampling step s (0 = first) is plan step N−1−s and '99-75' holds the first 25 of 100.
Layer names may carry the reference's leading `model.` (its QuantModel wraps the DiT in
`.model`); it is stripped so names match the DiT's own `named_modules()`.
Bits are 2..8, or 16 / "fp" for "keep in floating point" (stored as `FP_BITS`).

`remain_fp.txt` lists module-path prefixes kept in floating point, one per line, `#` comments.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

__all__ = ["FP_BITS", "BitPlan", "load_bit_plan", "load_fp_layers", "is_fp", "normalize_layer_name"]

FP_BITS = 16  # a bit width of 16 (or "fp" in a file) means: keep this layer in floating point
_ALLOWED_BITS = "2..8, or 16/'fp' for floating point"
_RANGE_KEY = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_MODEL_PREFIX = "model."


def normalize_layer_name(name: str) -> str:
    """Strip the reference's leading `model.` from a module path."""
    return name[len(_MODEL_PREFIX):] if name.startswith(_MODEL_PREFIX) else name


def _parse_bits(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "fp":
        return FP_BITS
    if isinstance(value, bool) or not isinstance(value, int) or not (2 <= value <= 8 or value == FP_BITS):
        raise ValueError(f"{where}: bad bit width {value!r}; allowed {_ALLOWED_BITS}")
    return value


def _parse_range(key: str) -> tuple[int, int]:
    """'99-75' -> (75, 99): the inclusive step range, low first."""
    match = _RANGE_KEY.match(str(key))
    if match is None:
        raise ValueError(f"bad timestep range key {key!r}; expected 'high-low' such as '99-75'")
    first, second = int(match.group(1)), int(match.group(2))
    return min(first, second), max(first, second)


@dataclasses.dataclass(frozen=True)
class BitPlan:
    """Bit widths per layer.

    default_bits: the width of every layer no override names (the config's base bits).
    overrides: {normalised layer name: bits} applying at every step.
    range_overrides: {"high-low": {layer name: bits}} applying within that step range;
        they win over `overrides`.
    source: where the plan came from (for error messages).
    """

    default_bits: int
    overrides: Mapping[str, int] = dataclasses.field(default_factory=dict)
    range_overrides: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        _parse_bits(self.default_bits, f"{self.source}: default_bits")
        overrides = {
            normalize_layer_name(name): _parse_bits(bits, f"{self.source}: {name}")
            for name, bits in self.overrides.items()
        }
        ranges = {}
        for range_key, mapping in self.range_overrides.items():
            _parse_range(range_key)
            ranges[str(range_key)] = MappingProxyType({
                normalize_layer_name(name): _parse_bits(bits, f"{self.source}: {range_key}.{name}")
                for name, bits in mapping.items()
            })
        spans = sorted((_parse_range(key), key) for key in ranges)
        for (first, first_key), (second, second_key) in zip(spans, spans[1:]):
            if second[0] <= first[1]:
                raise ValueError(f"{self.source}: timestep ranges {first_key!r} and {second_key!r} overlap")
        object.__setattr__(self, "overrides", MappingProxyType(overrides))
        object.__setattr__(self, "range_overrides", MappingProxyType(ranges))

    def base_bits(self, layer_name: str) -> int:
        """Bits of `layer_name` outside the per-range sections: its flat entry, else `default_bits`."""
        return self.overrides.get(normalize_layer_name(layer_name), self.default_bits)

    def range_steps(self) -> set[int]:
        """Every plan step that a range key holds (empty for a flat plan)."""
        steps = set()
        for key in self.range_overrides:
            low, high = _parse_range(key)
            steps.update(range(low, high + 1))
        return steps

    def range_key_for_step(self, step: int) -> str:
        """The range key whose inclusive 'high-low' interval holds plan step `step`."""
        for key in self.range_overrides:
            low, high = _parse_range(key)
            if low <= step <= high:
                return key
        raise ValueError(
            f"{self.source}: no timestep range holds step {step}; ranges are {list(self.range_overrides)}"
        )

    def bits_for(self, layer_name: str, range_key: str | int | None = None) -> int:
        """Bits for `layer_name` (a leading `model.` is ignored); FP_BITS means floating point.

        range_key: a range key such as '99-75', or a plan step (int, see the module docstring)
        looked up in the ranges. Required when the plan holds per-range overrides only.
        """
        name = normalize_layer_name(layer_name)
        if range_key is not None and self.range_overrides:
            key = self.range_key_for_step(range_key) if isinstance(range_key, int) else str(range_key)
            if key not in self.range_overrides:
                raise ValueError(
                    f"{self.source}: unknown timestep range {key!r}; ranges are {list(self.range_overrides)}"
                )
            if name in self.range_overrides[key]:
                return self.range_overrides[key][name]
        elif range_key is None and self.range_overrides and not self.overrides:
            raise ValueError(
                f"{self.source}: the plan is per timestep range ({list(self.range_overrides)}); "
                "pass range_key"
            )
        return self.base_bits(name)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"mixed-precision file not found: {path}")
    with open(path) as handle:
        try:
            return yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from error


def load_bit_plan(path: str | Path, default_bits: int) -> BitPlan:
    """Load a flat or per-timestep-range mixed-precision YAML into a `BitPlan`.

    Raises FileNotFoundError naming the path, ValueError for a non-mapping file, a mixture of
    the two shapes, a bad range key or a bad bit width (naming the key).
    """
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path}: expected a mapping {{layer.name: bits}} or {{'high-low': {{layer.name: bits}}}}, "
            f"got {type(data).__name__}"
        )
    nested = [key for key, value in data.items() if isinstance(value, Mapping)]
    if nested and len(nested) != len(data):
        raise ValueError(f"{path}: mixes per-range sections {nested[:3]} with flat layer entries")
    if nested:
        for key in data:
            try:
                _parse_range(key)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        return BitPlan(default_bits, {}, {str(k): v for k, v in data.items()}, source=str(path))
    return BitPlan(default_bits, {str(k): v for k, v in data.items()}, {}, source=str(path))


def load_fp_layers(path: str | Path) -> tuple[str, ...]:
    """Read a `remain_fp.txt`: one module-path prefix per line, `#` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fp-layer list not found: {path}")
    prefixes = []
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            prefixes.append(normalize_layer_name(entry))
    return tuple(prefixes)


def is_fp(name: str, fp_prefixes) -> bool:
    """True if module `name` is one of `fp_prefixes` or lies inside one of them.

    Matching is by whole path components: `blocks.6.mlp` matches `blocks.6.mlp.fc1`, but
    `blocks.1` does not match `blocks.10.attn.q`.
    """
    name = normalize_layer_name(name)
    for prefix in fp_prefixes:
        prefix = normalize_layer_name(prefix).rstrip(".")
        if name == prefix or name.startswith(prefix + "."):
            return True
    return False
