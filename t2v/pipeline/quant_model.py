"""Stage 5/6 building blocks: turn the FP STDiT into the quantized model of a saved calibration run, tell its
layers which sampling step runs, export its integer weights (stage 6) and load them for real low-bit inference.

    qmodel = build_quant_model(pipe.model, qconfig, "logs/calib/w4a8_qvdit/quant_params.safetensors")
    generate_videos(pipe, prompts, outdir, on_step=quant_step_hook(qmodel, pipe.sampler.num_sampling_steps))
    export_int_weights(fp32_model, qconfig, quant_params_path, "logs/calib/w4a8_qvdit/int_weights.safetensors")
    build_int_model(pipe.model, "logs/calib/w4a8_qvdit/int_weights.safetensors", qconfig)   # nn.Linear -> IntLinear
(configs with FP8 activations, e.g. w8a8_fp8: FP8Linear layers; docs/int_kernels.md, "FP8 path").
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from qdiff.api import (
    fold_model,
    load_quant_params,
    quant_layers,
    quantize_model,
    read_quant_params_header,
    set_quant_state,
    set_timestep,
)
from qdiff.config import QuantConfig

ADAPTER = "stdit"
INT_WEIGHTS_NAME = "int_weights.safetensors"
# STDiT constructor facts an integer-weights file must match (dtype and kernel switches may differ).
_MODEL_INFO_KEYS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                    "pred_sigma", "caption_channels", "model_max_length", "space_scale", "time_scale")


def build_quant_model(model: nn.Module, qconfig: QuantConfig, quant_params_path=None, fold: bool = False) -> nn.Module:
    """Quantize `model` in place with `qconfig` (adapter "stdit"), load saved quant params, switch
    weight and activation quantization on. Returns the model.

    quant_params_path: a file from `qdiff.api.save_quant_params` (stage 4); None keeps the fresh quantizers
        (weight ranges are then initialised at the first forward). A file saved from a folded model is loaded
        into a folded model. Raises `qdiff.api.QuantParamsError` (naming the differences) for a file made
        for another model or config.
    fold: bake W_eff into one dequantized weight per layer after loading (faster sampling, same output);
        refused (ValueError) for layers whose bits change per timestep.
    """
    saved_folded = False
    if quant_params_path is not None:
        header = read_quant_params_header(quant_params_path)  # fails fast on a missing / foreign file
        saved_folded = any(layer.get("folded") for layer in header["layers"].values())
    quantize_model(model, qconfig, adapter=ADAPTER)
    set_quant_state(model, weight=True, act=True)
    if saved_folded:
        fold_model(model)
    if quant_params_path is not None:
        load_quant_params(model, qconfig, quant_params_path)
    if fold:
        per_step = [name for name, layer in quant_layers(model) if layer.step_bits]
        if per_step:
            raise ValueError(f"--fold: {len(per_step)} layer(s) change bits per timestep (e.g. {per_step[0]}, from the "
                             "per-timestep-range bit maps); folding keeps one weight per range: run without --fold")
        fold_model(model)
    set_quant_state(model, weight=True, act=True)
    return model


def quant_step_hook(model: nn.Module, num_steps: int) -> Callable:
    """An `on_step` callback for `IDDPM.sample` / `generate_videos`: before each sampling step, tell the
    quantized layers which step (0 = noisiest) runs, so timestep-range parameters and per-step bits are
    selected. Every step is tried once here, so a bit map made for another step count fails before sampling."""
    for step in reversed(range(num_steps)):  # ends selecting step 0
        set_timestep(model, step, num_steps)

    def on_step(step, timestep, x_in, y_in, mask_in) -> None:
        set_timestep(model, step, num_steps)

    return on_step


def int_model_info(model: nn.Module) -> dict:
    """The STDiT facts recorded in (and checked against) an integer-weights file: its constructor config
    without dtype and kernel switches."""
    return {key: model.config[key] for key in _MODEL_INFO_KEYS}


def export_int_weights(model: nn.Module, qconfig: QuantConfig, quant_params_path, out_path, overwrite: bool = False) -> Path:
    """Stage 6: quantize the FP `model` (float32) with a calibration run's params and write its integer weights.

    Raises `qdiff.api.QuantParamsError` for params of another model/config, `qdiff.lowbit.IntExportError` for
    layers without an integer form (folded params, W-only layers, group-wise weights, several timestep ranges,
    per-timestep bits).
    """
    from qdiff.lowbit import IntExportError, export_int_model

    build_quant_model(model, qconfig, quant_params_path)
    per_step = [name for name, layer in quant_layers(model) if layer.step_bits]
    if per_step:
        raise IntExportError(f"{len(per_step)} layer(s) change bits per timestep (e.g. {per_step[0]}): integer export "
                             "holds one weight width per layer; drop the per-timestep-range bit maps")
    return export_int_model(model, out_path, qconfig, int_model_info(model), overwrite=overwrite)


def build_int_model(model: nn.Module, int_weights_path, qconfig: QuantConfig | None = None, backend: str = "auto") -> nn.Module:
    """Swap the FP STDiT's quantized linears (in place) for IntLinear (or FP8Linear) layers from a stage-6 file;
    returns the model.

    Raises `qdiff.lowbit.IntWeightsError` (listing the differences) for a file of another model or config.
    backend: 'auto' (Triton kernels on CUDA, torch integer ops elsewhere; FP8 layers: torch._scaled_mm where the
        device supports it), 'torch' (references) or 'triton'.
    """
    from qdiff.lowbit import load_int_model

    return load_int_model(model, int_weights_path, qconfig, int_model_info(model), backend=backend)
