"""Stage 5: text-to-video inference with the quantized model of a calibration run (stage 4's output folder).

    python -m t2v.scripts.quant_inference configs/opensora/qvdit_16x512x512.py \
        --ckpt_path logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors \
        --calib_dir logs/calib/w4a8_qvdit --precompute_text_embeds logs/text_embeds/t2v_samples_10.safetensors

The calibration folder holds `quant_config.yaml` (the resolved quant config) and `quant_params.safetensors`.
Videos get stage 2's names and seeds, so `t2v.scripts.compare_videos` can compare them with the FP run.

With --hardware the model runs real low-bit kernels instead of the fake-quant simulation: integer weights from
stage 6 (`t2v.scripts.export_int`, default <calib_dir>/int_weights.safetensors) are loaded into IntLinear layers
(Triton int8 GEMMs on CUDA, torch integer ops on CPU), or, for configs with FP8 activations, FP8Linear layers
(torch._scaled_mm FP8 GEMMs, a float32 reference where the device lacks it); videos go to <calib_dir>/videos_hardware
by default.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from t2v.scripts._common import (add_common_args, add_compile_arg, compile_if_requested, cuda_graph_if_requested,
                                 fail, resolve_run, resolve_speed_args, setup_logging)

QUANT_CONFIG_NAME = "quant_config.yaml"
QUANT_PARAMS_NAME = "quant_params.safetensors"
INT_WEIGHTS_NAME = "int_weights.safetensors"  # t2v.pipeline.quant_model.INT_WEIGHTS_NAME (kept import-free here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_compile_arg(p)
    p.add_argument("--calib_dir", default=None, help="stage-4 output folder (holds the two files below)")
    p.add_argument("--quant_config", default=None, help=f"quant YAML (default: <calib_dir>/{QUANT_CONFIG_NAME})")
    p.add_argument("--quant_params", default=None, help=f"quant params (default: <calib_dir>/{QUANT_PARAMS_NAME})")
    p.add_argument("--fold", action="store_true", help="fold the quantized weights once before sampling (faster)")
    p.add_argument("--hardware", action="store_true",
                   help="run real integer kernels with the stage-6 integer weights instead of fake quantization")
    p.add_argument("--int_weights", default=None, help=f"stage-6 file (default: <calib_dir>/{INT_WEIGHTS_NAME}); "
                                                       "implies --hardware")
    p.add_argument("--int_backend", choices=("auto", "torch", "triton"), default="auto",
                   help="--hardware kernels: auto = Triton on CUDA, torch integer ops elsewhere (FP8 layers: "
                        "torch._scaled_mm where supported; torch = their float32 reference; triton = _scaled_mm)")
    args = resolve_speed_args(p.parse_args(argv))
    args.hardware = args.hardware or args.int_weights is not None
    if args.hardware and args.fold:
        p.error("--fold applies to the fake-quant model; --hardware weights are integer already")
    calib_dir = Path(args.calib_dir) if args.calib_dir else None
    if args.hardware:
        if calib_dir is None and (args.quant_config is None or args.int_weights is None):
            p.error("--hardware: pass --calib_dir, or both --quant_config and --int_weights")
        args.int_weights = args.int_weights or str(calib_dir / INT_WEIGHTS_NAME)
        base = calib_dir or Path(args.int_weights).parent
    else:
        if calib_dir is None and (args.quant_config is None or args.quant_params is None):
            p.error("pass --calib_dir, or both --quant_config and --quant_params")
        args.quant_params = args.quant_params or str(calib_dir / QUANT_PARAMS_NAME)
        base = calib_dir or Path(args.quant_params).parent
    args.quant_config = args.quant_config or str(calib_dir / QUANT_CONFIG_NAME)
    if args.outdir is None:
        args.outdir = str(base / ("videos_hardware" if args.hardware else "videos"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from qdiff.api import read_quant_params_header
    from qdiff.config import QuantConfig
    from qdiff.lowbit import read_int_header
    from t2v.pipeline.quant_model import build_int_model, build_quant_model, quant_step_hook
    from t2v.pipeline.sample import build_pipeline, generate_videos

    try:
        run = resolve_run(args)
        qconfig = QuantConfig.from_yaml(args.quant_config)
        if args.hardware:  # fail before the (slow) model build
            read_int_header(args.int_weights)
        else:
            read_quant_params_header(args.quant_params)
        pipe = build_pipeline(run.cfg, ckpt_path=args.ckpt_path, precomputed_text_embeds=args.precompute_text_embeds,
                              device=run.device, num_sampling_steps=args.num_sampling_steps)
        if args.hardware:
            build_int_model(pipe.model, args.int_weights, qconfig, backend=args.int_backend)
        else:
            build_quant_model(pipe.model, qconfig, args.quant_params, fold=args.fold)
        compile_if_requested(pipe.model, args)
        cuda_graph_if_requested(pipe, args)
        on_step = quant_step_hook(pipe.model, pipe.sampler.num_sampling_steps)
        paths = generate_videos(pipe, run.prompts, run.outdir, seed=run.cfg.seed, prompt_indices=run.indices,
                                progress=run.is_main, overwrite=args.overwrite, on_step=on_step)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        return fail(exc)
    logging.getLogger("t2v").info("wrote %d quantized video(s) to %s", len(paths), run.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
