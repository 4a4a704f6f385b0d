"""Stage 6: export a calibration run's quantized STDiT as integer weights for real low-bit inference.

    python -m t2v.scripts.export_int configs/opensora/qvdit_16x512x512.py \\
        --ckpt_path logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors --calib_dir logs/calib/w4a8_qvdit

Reads <calib_dir>/quant_config.yaml and quant_params.safetensors (stage 4), writes <calib_dir>/int_weights.safetensors:
int8 weight codes (≤ 4-bit weights packed two per byte, 3-bit on its own grid in the 4-bit container), per-channel
scales and zero points, TQE post terms, smoothing scales and rotations, with a JSON header (bits, granularity, method,
layers, model fingerprint). Configs with FP8 activations (act.format: fp8_e4m3, e.g. configs/quant/w8a8_fp8.yaml,
w4a8_fp8.yaml) write FP8 layers instead: float8_e4m3fn weights, or ≤ 4-bit integer codes (exact in e4m3), with their
per-channel scales (format version 2). Then: `python -m t2v.scripts.quant_inference CONFIG --calib_dir DIR --hardware`.
Format and kernels: docs/int_kernels.md ("FP8 path" for the FP8 layers).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from t2v.scripts._common import fail, setup_logging

QUANT_CONFIG_NAME = "quant_config.yaml"
QUANT_PARAMS_NAME = "quant_params.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="OpenSora-style .py config, e.g. configs/opensora/qvdit_16x512x512.py")
    p.add_argument("--ckpt_path", default=None, help="split STDiT checkpoint (overrides model.from_pretrained)")
    p.add_argument("--calib_dir", default=None, help="stage-4 output folder (holds the two files below)")
    p.add_argument("--quant_config", default=None, help=f"quant YAML (default: <calib_dir>/{QUANT_CONFIG_NAME})")
    p.add_argument("--quant_params", default=None, help=f"quant params (default: <calib_dir>/{QUANT_PARAMS_NAME})")
    p.add_argument("--out", default=None, help="output file (default: <calib_dir>/int_weights.safetensors)")
    p.add_argument("--device", default=None, help="where the weights are quantized: cuda or cpu (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    if args.calib_dir is None and (args.quant_config is None or args.quant_params is None):
        p.error("pass --calib_dir, or both --quant_config and --quant_params")
    calib_dir = Path(args.calib_dir) if args.calib_dir else None
    args.quant_config = args.quant_config or str(calib_dir / QUANT_CONFIG_NAME)
    args.quant_params = args.quant_params or str(calib_dir / QUANT_PARAMS_NAME)
    if args.out is None:
        from t2v.pipeline.quant_model import INT_WEIGHTS_NAME

        args.out = str((calib_dir or Path(args.quant_params).parent) / INT_WEIGHTS_NAME)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from qdiff.api import read_quant_params_header
    from qdiff.config import QuantConfig
    from t2v.pipeline.build import build_model, build_vae, latent_size
    from t2v.pipeline.config import load_inference_config
    from t2v.pipeline.quant_model import export_int_weights

    try:
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
        cfg = load_inference_config(args.config)
        qconfig = QuantConfig.from_yaml(args.quant_config)
        read_quant_params_header(args.quant_params)  # fail before the (slow) model build
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        input_size = latent_size(cfg, build_vae(cfg))  # the VAE only fixes the latent size
        # the calibrated fp32 weights are what stage 4 quantized: export from them, whatever the sampling dtype
        model = build_model(cfg, input_size, ckpt_path=args.ckpt_path, device=device, dtype=torch.float32)
        path = export_int_weights(model, qconfig, args.quant_params, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as exc:
        return fail(exc)
    logging.getLogger("t2v").info("wrote integer weights (%.1f MB) to %s", path.stat().st_size / 2**20, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
