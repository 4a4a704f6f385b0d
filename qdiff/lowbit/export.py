"""Export a calibrated quantized model's linears as integer (or FP8) weights, and load them back as low-bit layers.

    convert_to_int(model)                                   # in memory: QuantLinear -> IntLinear / FP8Linear
    export_int_model(model, "logs/run/int_weights.safetensors", qconfig, model_info)
    load_int_model(fp_model, "logs/run/int_weights.safetensors", qconfig, model_info)   # nn.Linear -> low-bit layers

A QuantLinear with integer activations becomes an IntLinear (integer GEMM); one with FP8 activations
(act.format: fp8_e4m3) an FP8Linear (`qdiff.lowbit.fp8_linear`: e4m3 GEMM via torch._scaled_mm).

File: safetensors. Tensors `<layer>.<buffer>` (the layer's persistent buffers: IntLinear's qweight, w_scale, w_zero,
bias, smooth_scale, post_a, post_b, frame_scale, act_static; FP8Linear's the same without act_static, its qweight
float8_e4m3fn [N, K] or packed integer codes) and `_shared.rotation.<i>` for each distinct rotation that
is not the canonical `hadamard(K)` (canonical ones are regenerated, as QuantLinear does). JSON header:
format, format_version ("1"; "2" when the file holds FP8 layers), method, bits, granularity and formats summaries,
config (the resolved QuantConfig, or null), layers (per-layer table: kind, bits, formats, grids, container, TQE rank,
frames, balancing), model (architecture fingerprint and the caller's model_info). Loading compares config,
model_info, fingerprint and layer table with the target and raises IntWeightsError listing every difference.
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
from qdiff.lowbit.fp8_linear import FP8Linear, is_fp8_layer
from qdiff.lowbit.int_linear import BACKENDS, IntExportError, IntLinear, SharedInputQuant

FORMAT = "qdiff-int-weights"
FORMAT_VERSION = "1"  # files with integer layers only (unchanged since the first release)
FORMAT_VERSION_FP8 = "2"  # files with FP8Linear layers (layer entries carry "kind": "fp8")
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_FP8)
LOWBIT_TYPES = (IntLinear, FP8Linear)
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


def fp8_layers(model: nn.Module) -> Iterator[tuple[str, FP8Linear]]:
    """(name, layer) for every FP8Linear of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            yield name, module


def lowbit_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every IntLinear and FP8Linear of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LOWBIT_TYPES):
            yield name, module


def lowbit_from_quant_linear(layer: QuantLinear, backend: str = "auto") -> nn.Module:
    """The inference layer of a calibrated QuantLinear: FP8Linear when its activations are FP8, else IntLinear.

    backend: IntLinear's ('auto', 'torch', 'triton'); for FP8Linear 'triton' means its GEMM kernel ('scaled_mm').
    """
    if is_fp8_layer(layer):
        return FP8Linear.from_quant_linear(layer, backend=_fp8_backend(backend))
    if layer.weight_quantizer is not None and layer.weight_quantizer.fp8:
        raise IntExportError("FP8 weights (weight.format fp8_e4m3) need FP8 activations (act.format: fp8_e4m3): the "
                             "integer GEMM takes integer codes")
    return IntLinear.from_quant_linear(layer, backend=backend)


def _fp8_backend(backend: str) -> str:
    return {"triton": "scaled_mm"}.get(backend, backend)


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
    Layers with FP8 activations become FP8Linear (see `lowbit_from_quant_linear`).
    Raises IntExportError naming the first layer that cannot be converted (folded, W-only, group-wise, ...).
    """
    layers = list(quant_layers(model))
    if not layers:
        raise IntExportError("convert_to_int: the model has no QuantLinear layers (quantize and calibrate it first)")
    converted = {}
    for name, layer in layers:
        try:
            converted[name] = lowbit_from_quant_linear(layer, backend=backend)
        except IntExportError as exc:
            raise IntExportError(f"layer {name}: {exc}") from None
    for name, int_layer in converted.items():
        _set_module(model, name, int_layer)
    share_input_quantization(model, share_inputs)
    return model


def set_int_backend(model: nn.Module, backend: str) -> None:
    """Select 'auto' (Triton on CUDA), 'torch' (reference ops) or 'triton' for every IntLinear of `model`; FP8Linear
    layers get 'auto' (torch._scaled_mm where supported), 'torch' (reference) or, for 'triton', 'scaled_mm'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    for _, layer in int_layers(model):
        layer.backend = backend
    for _, layer in fp8_layers(model):
        layer.backend = _fp8_backend(backend)


def int_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, IntLinear layers counted at their integer size."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---------------------------------------------------------------------------------------------- fingerprint
_LINEAR_TYPES = (nn.Linear, QuantLinear, IntLinear, FP8Linear)


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


def _formats(table: dict[str, dict]) -> dict:
    """{'weight': [...], 'act': [...]}: the number formats in the file ('int' for IntLinear entries)."""
    return {"weight": sorted({v.get("w_format", "int") for v in table.values()}),
            "act": sorted({v.get("a_format", "int") for v in table.values()})}


@torch.no_grad()
def export_int_model(model: nn.Module, path, qconfig=None, model_info: dict | None = None, overwrite: bool = False) -> Path:
    """Write the integer form of `model`'s quantized layers (QuantLinear, converted on the fly, or IntLinear).

    Args:
        model: a calibrated quantized model (unfolded QuantLinear layers) or one already converted.
        path: output .safetensors (atomic write; FileExistsError unless `overwrite`).
        qconfig: the QuantConfig the model was calibrated with (recorded, compared at load), or None.
        model_info: JSON-able facts about the model (e.g. its constructor config), compared at load.
    """
    layers: dict[str, nn.Module] = {}
    for name, layer in quant_layers(model):
        try:
            layers[name] = lowbit_from_quant_linear(layer)
        except IntExportError as exc:
            raise IntExportError(f"layer {name}: {exc}") from None
    layers.update(dict(lowbit_layers(model)))
    merged = sorted(name for name, layer in layers.items() if getattr(layer, "merged_out_features", None))
    if merged:
        raise IntExportError(f"export_int_model: {merged[0]} merges several layers (qdiff.lowbit.merge, for inference "
                             "only); export the model before merging them")
    if not layers:
        raise IntExportError("export_int_model: the model has no QuantLinear, IntLinear or FP8Linear layers")
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
    has_fp8 = any(info.get("kind") == "fp8" for info in table.values())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION_FP8 if has_fp8 else FORMAT_VERSION,
        "method": "" if qconfig is None else qconfig.method,
        "bits": json.dumps(bits),
        "granularity": json.dumps(granularity),
        "config": json.dumps(None if qconfig is None else qconfig.to_dict(), sort_keys=True),
        "layers": json.dumps(table, sort_keys=True),
        "model": json.dumps({"architecture_sha256": architecture_fingerprint(model), "info": model_info}, sort_keys=True),
    }
    if has_fp8:  # (integer-only files keep the header of format version 1)
        meta["formats"] = json.dumps(_formats(table))
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
    """-> dict(method, bits, granularity, formats, config, layers, model, format_version) from an integer-weights
    file's header (formats: {'weight': [...], 'act': [...]}, ['int'] for files of format version 1)."""
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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise IntWeightsError(f"{path} has format version {meta.get('format_version')!r}; this qdiff reads "
                              f"{list(READABLE_VERSIONS)} (re-export it)")
    header = {key: json.loads(meta[key]) for key in ("bits", "granularity", "config", "layers", "model")}
    header["method"] = meta.get("method", "")
    header["format_version"] = meta["format_version"]
    header["formats"] = json.loads(meta["formats"]) if "formats" in meta else _formats(header["layers"])
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
    """Swap the linears named in an integer-weights file for IntLinear (FP8Linear, for the file's FP8 layers) layers
    loaded from it (in place).

    The target is the floating-point model (nn.Linear layers; QuantLinear / IntLinear / FP8Linear are replaced too).
    backend: as `set_int_backend`.
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
        if info.get("kind", "int") == "fp8":
            layer = FP8Linear.from_info(info, backend=_fp8_backend(backend))
        else:
            layer = IntLinear(
                info["in_features"], info["out_features"], info["w_bits"], info["a_bits"],
                w_symmetric=info["w_symmetric"], a_symmetric=info["a_symmetric"], act_mode=info["act_mode"],
                bias=info["bias"], num_frames=info["num_frames"], rank_out=info["rank_out"], smooth=info["smooth"],
                rotation=info["rotation"] is not None, backend=backend,
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
