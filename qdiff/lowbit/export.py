"""Export a calibrated quantized model's linears as integer weights, and load them back as IntLinear layers.

    convert_to_int(model)                                   # in memory: QuantLinear -> IntLinear
    export_int_model(model, "logs/run/int_weights.safetensors", qconfig, model_info)
    load_int_model(fp_model, "logs/run/int_weights.safetensors", qconfig, model_info)   # nn.Linear -> IntLinear

File: safetensors. Tensors `<layer>.<buffer>` (IntLinear's persistent buffers: qweight, w_scale, w_zero, bias,
smooth_scale, post_a, post_b, frame_scale, act_static) and `_shared.rotation.<i>` for each distinct rotation that
is not the canonical `hadamard(K)` (canonical ones are regenerated, as QuantLinear does). JSON header:
format, format_version, method, bits and granularity summaries, config (the resolved QuantConfig, or null),
layers (per-layer table: bits, grids, container, TQE rank, frames, balancing), model (architecture fingerprint and
the caller's model_info). Loading compares config, model_info, fingerprint and layer table with the target and
raises IntWeightsError listing every difference.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from qdiff.api import MODEL_SECTIONS, QuantParamsError, config_differences, quant_layers
from qdiff.balancing import hadamard
from qdiff.io import save_safetensors_atomic
from qdiff.layers import QuantLinear
from qdiff.lowbit.int_linear import BACKENDS, IntExportError, IntLinear, SharedInputQuant

FORMAT = "qdiff-int-weights"
FORMAT_VERSION = "1"
_SHARED_PREFIX = "_shared.rotation."
_MAX_LISTED = 12


class IntWeightsError(QuantParamsError):
    """An integer-weights file does not fit the model or config (or is not one); the message lists the differences."""


# ---------------------------------------------------------------------------------------------- in memory
def int_layers(model: nn.Module) -> Iterator[tuple[str, IntLinear]]:
    """(name, layer) for every IntLinear of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, IntLinear):
            yield name, module


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def share_input_quantization(model: nn.Module, enabled: bool = True) -> None:
    """Give every IntLinear of `model` one shared `SharedInputQuant` memo (or none): layers without balancing
    that read the same input tensor (q, k, v) then quantize it once. Outputs are unchanged."""
    memo = SharedInputQuant() if enabled else None
    for _, layer in int_layers(model):
        layer.input_memo = memo


@torch.no_grad()
def convert_to_int(model: nn.Module, backend: str = "auto", share_inputs: bool = True) -> nn.Module:
    """Replace every QuantLinear of `model` (in place) by its IntLinear; returns the model.

    share_inputs: quantize an input that several layers read once (`share_input_quantization`).
    Raises IntExportError naming the first layer that cannot be converted (folded, W-only, group-wise, ...).
    """
    layers = list(quant_layers(model))
    if not layers:
        raise IntExportError("convert_to_int: the model has no QuantLinear layers (quantize and calibrate it first)")
    converted = {}
    for name, layer in layers:
        try:
            converted[name] = IntLinear.from_quant_linear(layer, backend=backend)
        except IntExportError as exc:
            raise IntExportError(f"layer {name}: {exc}") from None
    for name, int_layer in converted.items():
        _set_module(model, name, int_layer)
    share_input_quantization(model, share_inputs)
    return model


def set_int_backend(model: nn.Module, backend: str) -> None:
    """Select 'auto' (Triton on CUDA), 'torch' (reference ops) or 'triton' for every IntLinear of `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    for _, layer in int_layers(model):
        layer.backend = backend


def int_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, IntLinear layers counted at their integer size."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------- fingerprint
_LINEAR_TYPES = (nn.Linear, QuantLinear, IntLinear)


def architecture_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's structure: every linear-like module's (name, in, out, bias) and every other
    module's own parameter/buffer names and shapes. Independent of dtype, device and quantization state, so the
    FP model, its QuantLinear version and its IntLinear version share one fingerprint."""
    entries = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, _LINEAR_TYPES):
            entries.append(f"{name}:linear:{module.in_features}x{module.out_features}:bias={module.bias is not None}")
            skip.append(name + ".")
            continue
        for kind, tensors in (("param", module.named_parameters(recurse=False)), ("buffer", module.named_buffers(recurse=False))):
            for tensor_name, tensor in tensors:
                if tensor is not None:
                    entries.append(f"{name}.{tensor_name}:{kind}:{tuple(tensor.shape)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- save
def _summary(table: dict[str, dict]) -> tuple[dict, dict]:
    bits = {"weight": sorted({v["w_bits"] for v in table.values()}), "act": sorted({v["a_bits"] for v in table.values()})}
    granularity = {"weight": sorted({v["w_granularity"] for v in table.values()}),
                   "act": sorted({v["a_granularity"] for v in table.values()})}
    return bits, granularity


@torch.no_grad()
def export_int_model(model: nn.Module, path, qconfig=None, model_info: dict | None = None, overwrite: bool = False) -> Path:
    """Write the integer form of `model`'s quantized layers (QuantLinear, converted on the fly, or IntLinear).

    Args:
        model: a calibrated quantized model (unfolded QuantLinear layers) or one already converted.
        path: output .safetensors (atomic write; FileExistsError unless `overwrite`).
        qconfig: the QuantConfig the model was calibrated with (recorded, compared at load), or None.
        model_info: JSON-able facts about the model (e.g. its constructor config), compared at load.
    """
    layers: dict[str, IntLinear] = {}
    for name, layer in quant_layers(model):
        try:
            layers[name] = IntLinear.from_quant_linear(layer)
        except IntExportError as exc:
            raise IntExportError(f"layer {name}: {exc}") from None
    layers.update(dict(int_layers(model)))
    if not layers:
        raise IntExportError("export_int_model: the model has no QuantLinear or IntLinear layers")
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict] = {}
    rotations: list[torch.Tensor] = []
    for name in sorted(layers):
        layer = layers[name]
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value
        info = layer.layer_info()
        info["rotation"] = None if layer.rotation is None else _rotation_key(layer.rotation, rotations)
        table[name] = info
    for index, rotation in enumerate(rotations):
        tensors[f"{_SHARED_PREFIX}{index}"] = rotation.float()
    bits, granularity = _summary(table)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "" if qconfig is None else qconfig.method,
        "bits": json.dumps(bits),
        "granularity": json.dumps(granularity),
        "config": json.dumps(None if qconfig is None else qconfig.to_dict(), sort_keys=True),
        "layers": json.dumps(table, sort_keys=True),
        "model": json.dumps({"architecture_sha256": architecture_fingerprint(model), "info": model_info}, sort_keys=True),
    }
    return save_safetensors_atomic(tensors, path, metadata=meta, overwrite=overwrite)


def _rotation_key(rotation: torch.Tensor, stored: list[torch.Tensor]) -> str:
    """'hadamard' for the canonical matrix (regenerated at load), else the key of its stored copy."""
    order = rotation.shape[0]
    try:
        if torch.equal(rotation.float().cpu(), hadamard(order)):
            return "hadamard"
    except ValueError:  # no canonical Hadamard of this order
        pass
    for index, other in enumerate(stored):
        if other.shape == rotation.shape and torch.equal(other, rotation.float().cpu()):
            return f"{_SHARED_PREFIX}{index}"
    stored.append(rotation.float().cpu())
    return f"{_SHARED_PREFIX}{len(stored) - 1}"


# ---------------------------------------------------------------------------------------------- load
def read_int_header(path) -> dict:
    """-> dict(method, bits, granularity, config, layers, model) from an integer-weights file's header."""
    path = Path(path)
    if not path.is_file():
        raise IntWeightsError(f"integer weights not found: {path} (run stage 6, t2v.scripts.export_int, first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise IntWeightsError(f"{path} is not a safetensors integer-weights file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise IntWeightsError(f"{path} is not a qdiff integer-weights file (header has no format '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise IntWeightsError(f"{path} has format version {meta.get('format_version')!r}; this qdiff reads "
                              f"{FORMAT_VERSION!r} (re-export it)")
    header = {key: json.loads(meta[key]) for key in ("bits", "granularity", "config", "layers", "model")}
    header["method"] = meta.get("method", "")
    return header


def _target_table(model: nn.Module, names) -> dict[str, dict]:
    """The shapes the file's layers would replace in `model`: {name: {in_features, out_features, bias}}."""
    table = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, _LINEAR_TYPES):
            table[name] = {"in_features": module.in_features, "out_features": module.out_features,
                           "bias": module.bias is not None}
    return table


def check_int_header(header: dict, model: nn.Module, qconfig=None, model_info: dict | None = None) -> list[str]:
    """Every difference between a file's header and the target model / config (empty list: it fits)."""
    diffs = []
    if qconfig is not None:
        saved = header["config"]
        if saved is None:
            diffs.append("config: the file records no quant config, a config was given")
        else:
            diffs += config_differences({k: saved.get(k) for k in MODEL_SECTIONS},
                                  {k: qconfig.to_dict().get(k) for k in MODEL_SECTIONS})
    if model_info is not None:
        diffs += config_differences({"model_info": header["model"].get("info") or {}}, {"model_info": model_info})
    layers = header["layers"]
    target = _target_table(model, layers)
    missing = sorted(set(layers) - set(target))
    if missing:
        diffs.append(f"{len(missing)} layer(s) of the file are not linear layers of the model, e.g. {missing[:3]}")
    for name in sorted(target):
        saved = {key: layers[name][key] for key in ("in_features", "out_features", "bias")}
        diffs += config_differences(saved, target[name], f"{name}.")
    if header["model"].get("architecture_sha256") != architecture_fingerprint(model):
        diffs.append("model architecture fingerprint differs (the model's module names or tensor shapes are not "
                     "those of the exporting model)")
    return diffs


@torch.no_grad()
def load_int_model(model: nn.Module, path, qconfig=None, model_info: dict | None = None, backend: str = "auto",
                   share_inputs: bool = True) -> nn.Module:
    """Swap the linears named in an integer-weights file for IntLinear layers loaded from it (in place).

    The target is the floating-point model (nn.Linear layers; QuantLinear / IntLinear are replaced too).
    share_inputs: quantize an input that several layers read once (`share_input_quantization`).
    Raises IntWeightsError listing every difference of config, model_info, architecture and layer shapes.
    """
    path = Path(path)
    header = read_int_header(path)
    diffs = check_int_header(header, model, qconfig, model_info)
    if diffs:
        shown = "\n  ".join(diffs[:_MAX_LISTED])
        more = f"\n  ... and {len(diffs) - _MAX_LISTED} more" if len(diffs) > _MAX_LISTED else ""
        raise IntWeightsError(f"{path} was made for another model or config:\n  {shown}{more}")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for name, info in header["layers"].items():
        old = model.get_submodule(name)
        device = next(iter(list(old.parameters()) + list(old.buffers())), torch.empty(0)).device
        layer = IntLinear(
            info["in_features"], info["out_features"], info["w_bits"], info["a_bits"], w_symmetric=info["w_symmetric"],
            a_symmetric=info["a_symmetric"], act_mode=info["act_mode"], bias=info["bias"], num_frames=info["num_frames"],
            rank_out=info["rank_out"], smooth=info["smooth"], rotation=info["rotation"] is not None, backend=backend,
        )
        prefix = name + "."
        own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        expected = set(layer.state_dict())
        if set(own) != expected:
            raise IntWeightsError(f"{path}: layer {name} has tensors {sorted(own)}, expected {sorted(expected)}")
        for key, value in own.items():
            if value.dtype != layer.state_dict()[key].dtype or value.shape != layer.state_dict()[key].shape:
                raise IntWeightsError(f"{path}: {prefix}{key} is {value.dtype} {tuple(value.shape)}, expected "
                                      f"{layer.state_dict()[key].dtype} {tuple(layer.state_dict()[key].shape)}")
        layer.load_state_dict(own)
        if info["rotation"] == "hadamard":
            layer.rotation = hadamard(info["in_features"])
        elif info["rotation"] is not None:
            if info["rotation"] not in tensors:
                raise IntWeightsError(f"{path}: layer {name} names rotation {info['rotation']!r}, which the file lacks")
            layer.rotation = tensors[info["rotation"]].float()
        _set_module(model, name, layer.to(device))
    share_input_quantization(model, share_inputs)
    return model
