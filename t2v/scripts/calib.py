"""Stage 4: calibrate a quantized STDiT (PTQ initialisation + Q-VDiT TQE/TMD distillation) on calibration data.

    python -m t2v.scripts.calib configs/opensora/qvdit_16x512x512.py \
        --ckpt_path logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors \
        --quant_config configs/quant/w4a8_qvdit.yaml --calib_data logs/calib_data --outdir logs/calib/w4a8_qvdit
    python -m t2v.scripts.calib configs/opensora/tiny.py --quant_config configs/quant/w4a6_qvdit.yaml \
        --calib_data logs/tiny_calib_data --outdir logs/calib/tiny --set calib.n_steps=10 --set calib.n_prompts=2
    torchrun --nproc_per_node 4 -m t2v.scripts.calib ...   # distillation data-parallel (gradients averaged)

Writes quant_params.safetensors, quant_config.yaml, inference_config.py and distill_history.json to --outdir
(see t2v/pipeline/ptq.py). An interrupted distillation continues with --resume. The FP targets of the
calibration rows are computed once and cached in --calib_data (fp_targets_*.safetensors; reruns, resumes and
other quant configs on the same data and model reuse them; `--set distill.fp_targets=online` runs the FP
model every iteration instead).
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from t2v.scripts._common import fail, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="OpenSora-style .py inference config, e.g. configs/opensora/qvdit_16x512x512.py")
    p.add_argument("--ckpt_path", default=None, help="split STDiT checkpoint (overrides model.from_pretrained)")
    p.add_argument("--quant_config", required=True, help="quantization YAML, e.g. configs/quant/w4a8_qvdit.yaml")
    p.add_argument("--calib_data", default="logs/calib_data", help="calibration-data folder from stage 3")
    p.add_argument("--outdir", required=True, help="output folder, e.g. logs/calib/w4a8_qvdit")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a quant-config field, e.g. --set distill.iterations=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation in --outdir")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in --outdir")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--balance_rows", type=int, default=256,
                   help="calibration rows forwarded for the channel-balancing statistics (default 256)")
    p.add_argument("--log_every", type=int, default=100, help="log the distillation loss every N iterations")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.balance_rows < 1 or args.log_every < 1:
        p.error("--balance_rows and --log_every must be positive")
    return args


def _device(requested: str | None, rank: int, world_size: int) -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world_size > 1:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    return device


def _warn_if_config_differs(cfg, data_config: dict) -> None:
    """The data should come from the same model/sampler settings (the reference uses one config for stages 3-5)."""
    import json

    current = json.loads(json.dumps(cfg.to_dict()))
    for key in ("model", "scheduler", "num_frames", "image_size", "dtype"):
        if key in data_config and data_config[key] != current.get(key):
            logging.getLogger("t2v").warning("%s differs from the calibration data's: data %r, config %r",
                                             key, data_config[key], current.get(key))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.distill.trainer import DistillDivergedError
    from t2v.pipeline.build import build_model
    from t2v.pipeline.config import load_inference_config
    from t2v.pipeline.distributed import destroy_process_group_if_needed, init_process_group_if_needed, world
    from t2v.pipeline.ptq import calibrate, check_outdir, open_calib_data

    errors = (ValueError, FileNotFoundError, FileExistsError, OSError, NotImplementedError)
    rank, world_size = world()
    try:
        cfg = load_inference_config(args.config)
        qconfig = apply_overrides(QuantConfig.from_yaml(args.quant_config), args.overrides)
        check_outdir(args.outdir, args.resume, args.overwrite)
        calib = open_calib_data(args.calib_data, qconfig)
        device = _device(args.device, rank, world_size)
        # calibration runs the fp32 master weights; the latent size is the one the data were captured at
        model = build_model(cfg, calib.latent_shape[1:], ckpt_path=args.ckpt_path, device=device, dtype=torch.float32)
        calib.check_compatible(model)
        _warn_if_config_differs(cfg, calib.config)
        init_process_group_if_needed(device)
    except errors as exc:
        return fail(exc)
    try:
        path = calibrate(model, qconfig, calib, args.outdir, resume=args.resume, overwrite=args.overwrite,
                         device=device, progress=not args.no_progress, inference_config=cfg,
                         balance_rows=args.balance_rows, log_every=args.log_every)
    except errors as exc:
        return fail(exc)
    except DistillDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_process_group_if_needed()
    if rank == 0:
        logging.getLogger("t2v").info("calibration results in %s", path.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
