"""Stage 5 building blocks: turn the FP STDiT into the quantized model of a saved calibration run, and tell
its layers which sampling step runs.

    qmodel = build_quant_model(pipe.model, qconfig, "logs/calib/w4a8_qvdit/quant_params.safetensors")
    generate_videos(pipe, prompts, outdir, on_step=quant_step_hook(qmodel, pipe.sampler.num_sampling_steps))
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from qdiff.api import fold_model, load_quant_params, quantize_model, read_quant_params_header, set_quant_state, set_timestep
from qdiff.config import QuantConfig

ADAPTER = "stdit"


def build_quant_model(model: nn.Module, qconfig: QuantConfig, quant_params_path=None, fold: bool = False) -> nn.Module:
    """Quantize `model` in place with `qconfig` (adapter "stdit"), load saved quant params, switch
    weight and activation quantization on. Returns the model.

    quant_params_path: a file from `qdiff.api.save_quant_params` (stage 4); None keeps the fresh quantizers
        (weight ranges are then initialised at the first forward). A file saved from a folded model is loaded
        into a folded model. Raises `qdiff.api.QuantParamsError` (naming the differences) for a file made
        for another model or config.
    fold: bake W_eff into one dequantized weight per layer after loading (faster sampling, same output).
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
        fold_model(model)
    set_quant_state(model, weight=True, act=True)
    return model


def quant_step_hook(model: nn.Module, num_steps: int) -> Callable:
    """An `on_step` callback for `IDDPM.sample` / `generate_videos`: before each sampling step, tell the
    quantized layers which step (0 = noisiest) runs, so timestep-range parameters are selected."""

    def on_step(step, timestep, x_in, y_in, mask_in) -> None:
        set_timestep(model, step, num_steps)

    return on_step
