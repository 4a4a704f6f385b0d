"""The public one-call API: swap a model's linears for QuantLinear, switch quantization on/off, tell
the layers which timestep runs, initialise balancing and static ranges, save and load quant params.

    qcfg = QuantConfig.from_yaml("configs/quant/w4a8_qvdit.yaml")
    qmodel = quantize_model(model, qcfg, adapter="stdit")      # in place; returns the model
    calibrate_balancing(qmodel, qcfg, run_calibration)          # act stats -> smoothing / rotation
    set_quant_state(qmodel, weight=True, act=True)
    set_timestep(qmodel, step_index=0, num_steps=100)           # before each sampling step
    save_quant_params(qmodel, qcfg, "logs/run/quant_params.safetensors")

The quant-params file is safetensors holding every QuantLinear tensor except the base weight and bias
(those come from the model checkpoint), with a JSON header: the resolved config and a table of the
quantized layers (shape, bits, frames). Loading compares both and names what differs.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from qdiff.adapters import ModelAdapter, get_adapter
from qdiff.balancing import hadamard, smooth_scales
from qdiff.config import QuantConfig
from qdiff.io import save_safetensors_atomic
from qdiff.layers import QuantLinear
from qdiff.quantizers import StaticActQuantizer

FORMAT_VERSION = "1"
# Config sections that change what the quantized model computes (distill/calib only say how it was made).
MODEL_SECTIONS = ("method", "weight", "act", "tqe", "balance", "fp_layers")


class QuantParamsError(ValueError):
    """A quant-params file does not fit the model or config; the message says what differs."""


def quantize_model(model: nn.Module, qconfig: QuantConfig, adapter: str | ModelAdapter | None = None) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by a QuantLinear with its resolved bits.

    Layers in the config's floating-point list, and layers whose weight and activation bits both
    resolve to floating point, stay `nn.Linear`. Quantization starts switched off (the model computes
    exactly what it did); use `set_quant_state`. The adapter names model facts (which layers are
    temporal and how many frames they see); without one every layer is treated as a plain linear.
    """
    adapter = get_adapter(adapter)
    num_ranges = qconfig.calib.timestep_ranges
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ValueError("quantize_model: the model has no nn.Linear layers to quantize")
    for name, linear in targets:
        w_bits, a_bits = qconfig.resolve_bits(name)
        if w_bits is None and a_bits is None:
            continue
        weight_cfg = None if w_bits is None else dataclasses.replace(qconfig.weight, bits=w_bits)
        act_cfg = None if a_bits is None else dataclasses.replace(qconfig.act, bits=a_bits)
        tqe = qconfig.tqe if weight_cfg is not None else None
        layer = QuantLinear.from_linear(linear, weight_cfg, act_cfg, tqe=tqe,
                                        num_frames=adapter.num_frames_for(name, model), num_ranges=num_ranges)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, layer) for every QuantLinear of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def set_quant_state(model: nn.Module, weight: bool = True, act: bool = True) -> None:
    """Switch weight / activation fake quantization on or off in every QuantLinear."""
    for _, layer in quant_layers(model):
        layer.quant_weight = weight
        layer.quant_act = act


@contextmanager
def quant_state(model: nn.Module, weight: bool, act: bool):
    """`set_quant_state` for the duration of a `with` block; every layer's previous switches restored after."""
    layers = [layer for _, layer in quant_layers(model)]
    before = [(layer.quant_weight, layer.quant_act) for layer in layers]
    set_quant_state(model, weight=weight, act=act)
    try:
        yield
    finally:
        for layer, (w, a) in zip(layers, before):
            layer.quant_weight, layer.quant_act = w, a


def set_timestep(model: nn.Module, step_index: int, num_steps: int) -> None:
    """Tell every layer which sampling step runs (0 = first, noisiest): selects its timestep range.

    With R timestep ranges (`calib.timestep_ranges`), steps are split into R equal consecutive groups.
    """
    if not 0 <= step_index < num_steps:
        raise ValueError(f"set_timestep: step_index must be in 0..{num_steps - 1}, got {step_index}")
    for _, layer in quant_layers(model):
        layer.set_range_index(step_index * layer.num_ranges // num_steps)


@torch.no_grad()
def calibrate_balancing(model: nn.Module, qconfig: QuantConfig, run_calibration: Callable[[], None]) -> None:
    """Initialise channel balancing (and static activation ranges) from calibration forwards.

    `run_calibration()` runs the model on calibration inputs (in floating point). Order, as ViDiT-Q:
    1. activation statistics (momentum of per-channel absmax) on the unbalanced model;
    2. smoothing scales s = max|X|^α / max|W|^(1−α) and/or the Hadamard rotation are installed;
    3. if activations are static, their ranges are observed on the balanced inputs.
    """
    method = qconfig.balance.method
    static = any(isinstance(layer.act_quantizer, StaticActQuantizer) for _, layer in quant_layers(model))
    set_quant_state(model, weight=False, act=False)
    if method != "none":
        with _observe(model, stats=True, static=False):
            run_calibration()
        for _, layer in quant_layers(model):
            install_balance(layer, qconfig)
    if static:
        with _observe(model, stats=False, static=True):
            run_calibration()


def install_balance(layer: QuantLinear, qconfig: QuantConfig) -> None:
    """Set the layer's smoothing scales (from its recorded `act_absmax`) and/or rotation."""
    method = qconfig.balance.method
    scale = rotation = None
    if method in ("smooth", "smooth_rotate"):
        if int(layer.act_stats_count) == 0:
            raise RuntimeError("install_balance: no activation statistics recorded (run calibration first)")
        scale = smooth_scales(layer.act_absmax, layer.weight, qconfig.balance.alpha)
    if method in ("rotate", "smooth_rotate"):
        rotation = hadamard(layer.in_features, device=layer.weight.device)
    layer.set_balance(smooth_scale=scale, rotation=rotation)


@contextmanager
def _observe(model: nn.Module, stats: bool, static: bool):
    layers = [layer for _, layer in quant_layers(model)]
    quantizers = [l.act_quantizer for l in layers if isinstance(l.act_quantizer, StaticActQuantizer)]
    for layer in layers:
        layer.observe_act_stats = stats
    for q in quantizers:
        q.observing = static
    if static:  # the quantizer only sees inputs while activation quantization is on (observing passes x through)
        set_quant_state(model, weight=False, act=True)
    try:
        yield
    finally:
        for layer in layers:
            layer.observe_act_stats = False
        for q in quantizers:
            q.observing = False
        set_quant_state(model, weight=False, act=False)


@torch.no_grad()
def init_weight_quantizers(model: nn.Module) -> None:
    """Initialise every weight quantizer's range now (grid search on W' + B·A, every timestep range)."""
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is None or layer.folded_weight is not None:
            continue
        for r in range(layer.num_ranges):
            layer.effective_weight(r)


def trainable_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Distillation groups over the whole model: 'tqe' (low-rank terms, frame scales) and 'delta'."""
    groups: dict[str, list[nn.Parameter]] = {"tqe": [], "delta": []}
    for _, layer in quant_layers(model):
        for key, params in layer.trainable_parameters().items():
            groups[key].extend(params)
    return groups


def fold_model(model: nn.Module) -> None:
    """Materialise W_eff once in every weight-quantized layer (inference after distillation)."""
    for _, layer in quant_layers(model):
        if layer.weight_quantizer is not None:
            layer.quant_weight = True
            layer.fold()


# ------------------------------------------------------------------------------ save / load
def _layer_table(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "w_bits": layer.weight_cfg.bits if layer.weight_cfg else None,
            "a_bits": layer.act_cfg.bits if layer.act_cfg else None,
            "num_frames": layer.num_frames,
            "num_ranges": layer.num_ranges,
            "folded": layer.folded_weight is not None,
        }
        for name, layer in quant_layers(model)
    }


def _quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantLinear tensor except its base weight/bias (which the model checkpoint holds)."""
    state = {}
    for name, layer in quant_layers(model):
        for key, value in layer.state_dict().items():
            if key in ("weight", "bias") or value is None:
                continue
            state[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return state


def save_quant_params(model: nn.Module, qconfig: QuantConfig, path, overwrite: bool = False) -> Path:
    """Write the quant params of `model` as safetensors with a JSON header (atomic)."""
    meta = {
        "format": "qdiff-quant-params",
        "format_version": FORMAT_VERSION,
        "config": json.dumps(qconfig.to_dict(), sort_keys=True),
        "layers": json.dumps(_layer_table(model), sort_keys=True),
    }
    return save_safetensors_atomic(_quant_state(model), path, metadata=meta, overwrite=overwrite)


def read_quant_params_header(path) -> dict:
    """-> dict(config=..., layers=...) from a quant-params file's header."""
    path = Path(path)
    if not path.is_file():
        raise QuantParamsError(f"quant params not found: {path} (run the calibration stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise QuantParamsError(f"{path} is not a safetensors quant-params file: {exc}") from None
    if meta.get("format") != "qdiff-quant-params":
        raise QuantParamsError(f"{path} is not a qdiff quant-params file (header has no format 'qdiff-quant-params')")
    return {"config": json.loads(meta["config"]), "layers": json.loads(meta["layers"])}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Leaf-by-leaf differences of two nested config dicts, as "a.b: file has X, current has Y" lines."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: file has {a!r}, current has {b!r}")
    return out


def load_quant_params(model: nn.Module, qconfig: QuantConfig, path) -> None:
    """Load quant params saved by `save_quant_params` into a model quantized with `qconfig`.

    Refuses (QuantParamsError naming the differences) a file made for other layers / bits / method.
    Folded files load into a model that is folded the same way (call `fold_model` first).
    """
    header = read_quant_params_header(path)
    saved_cfg = {k: header["config"].get(k) for k in MODEL_SECTIONS}
    current_cfg = {k: qconfig.to_dict().get(k) for k in MODEL_SECTIONS}
    diffs = config_differences(saved_cfg, current_cfg)
    saved_layers, current_layers = header["layers"], _layer_table(model)
    missing = sorted(set(saved_layers) - set(current_layers))
    extra = sorted(set(current_layers) - set(saved_layers))
    if missing:
        diffs.append(f"{len(missing)} quantized layer(s) in the file are not in the model, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"{len(extra)} quantized layer(s) of the model are not in the file, e.g. {extra[:3]}")
    for name in sorted(set(saved_layers) & set(current_layers)):
        diffs += config_differences(saved_layers[name], current_layers[name], f"{name}.")
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise QuantParamsError(f"{path} was made for another model or config:\n  {shown}")

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, layer in quant_layers(model):
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = {k for k in layer.state_dict() if k not in ("weight", "bias")}
        absent = sorted(k for k in expected if k not in own and getattr(layer, k, None) is not None)
        if absent:
            raise QuantParamsError(f"{path}: layer {name} lacks tensors {absent}")
        own.update({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
        layer.load_state_dict(own, strict=False)
        if layer._rotate:
            layer.set_balance(smooth_scale=layer.smooth_scale, rotation=hadamard(layer.in_features, device=layer.act_absmax.device))
