"""OpenSora-style `.py` inference configs (read with mmengine) turned into a validated, frozen dataclass.

A config file defines the module-level names below (`_base_` inheritance works as in mmengine):

    num_frames, fps, image_size, model, vae, text_encoder, scheduler, dtype, batch_size, seed,
    prompt_path, save_dir

Unknown top-level names and unknown keys inside `scheduler` are errors that name the key and the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("fp32", "fp16", "bf16")
SAMPLERS = ("iddpm", "ddim")
PREDICTIONS = ("eps", "v")  # = t2v.schedulers.iddpm.PREDICTIONS (this module does not import torch)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class SchedulerConfig:
    type: str = "iddpm"
    num_sampling_steps: int = 100
    cfg_scale: float = 7.0
    sampler: str = "iddpm"  # "iddpm": ancestral p_sample (OpenSora); "ddim": eta=0 (Q-VDiT pipeline)
    cfg_split: bool = False  # run the cond and uncond halves as two forwards (Q-VDiT pipeline)
    # What the model predicts, "eps" (OpenSora) or "v" (a tiny-model training option). None: the model's own, i.e.
    # what a tiny_trained file records, else "eps". Set it only to assert it: a mismatch with the file is an error.
    prediction: str | None = None

    def __post_init__(self):
        if self.type != "iddpm":
            raise ConfigError(f"scheduler.type: expected 'iddpm', got {self.type!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"scheduler.sampler: expected one of {SAMPLERS}, got {self.sampler!r}")
        if self.prediction is not None and self.prediction not in PREDICTIONS:
            raise ConfigError(f"scheduler.prediction: expected one of {PREDICTIONS}, got {self.prediction!r}")
        if not (isinstance(self.num_sampling_steps, int) and 1 <= self.num_sampling_steps <= 1000):
            raise ConfigError(f"scheduler.num_sampling_steps: expected an int in 1..1000, got {self.num_sampling_steps!r}")


@dataclass(frozen=True)
class InferenceConfig:
    num_frames: int
    image_size: tuple[int, int]
    model: dict
    vae: dict
    text_encoder: dict
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fps: int = 8
    dtype: str = "fp16"
    batch_size: int = 1
    seed: int = 42
    prompt_path: str | None = None
    save_dir: str = "logs/inference"
    source: str = ""  # the file this config was read from

    def __post_init__(self):
        where = f" (in {self.source})" if self.source else ""
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}{where}")
        if len(self.image_size) != 2 or any(int(s) <= 0 for s in self.image_size):
            raise ConfigError(f"image_size: expected (height, width), got {self.image_size!r}{where}")
        if self.num_frames <= 0 or self.batch_size <= 0:
            raise ConfigError(f"num_frames and batch_size must be positive{where}")
        for key in ("model", "vae", "text_encoder"):
            if "type" not in getattr(self, key):
                raise ConfigError(f"{key}.type is missing{where}")

    def replace(self, **changes) -> "InferenceConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(InferenceConfig)} - {"source"}


def load_inference_config(path: str | Path) -> InferenceConfig:
    """Read an OpenSora-style `.py` config and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    from mmengine.config import Config  # lazy: mmengine is only needed for .py configs

    try:
        raw = Config.fromfile(str(path)).to_dict()
    except Exception as exc:  # syntax errors in the user's file
        raise ConfigError(f"could not read config {path}: {exc}") from None
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "") -> InferenceConfig:
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} in {source or 'config'}; allowed: {sorted(_FIELDS)}")
    missing = [k for k in ("num_frames", "image_size", "model", "vae", "text_encoder") if k not in raw]
    if missing:
        raise ConfigError(f"missing config key(s) {missing} in {source or 'config'}")
    sched = dict(raw.get("scheduler", {}))
    allowed = {f.name for f in dataclasses.fields(SchedulerConfig)}
    bad = sorted(set(sched) - allowed)
    if bad:
        raise ConfigError(f"unknown key(s) scheduler.{bad} in {source or 'config'}; allowed: {sorted(allowed)}")
    raw["scheduler"] = SchedulerConfig(**sched)
    raw["image_size"] = tuple(int(s) for s in raw["image_size"])
    for key in ("model", "vae", "text_encoder"):
        raw[key] = dict(raw[key])
    return InferenceConfig(**raw, source=source)
