#!/usr/bin/env bash
# Stage 6: export a calibration run (stage 4's output folder) as integer weights for `5_quant_inference.sh --hardware`.
# Usage: EXP_NAME=w4a8_qvdit bash shell_scripts/6_export_int.sh [GPU_ID] [extra args, e.g. --overwrite]
set -euo pipefail
GPU=${1:-${GPU:-0}}; shift || true
EXP_NAME=${EXP_NAME:-w4a8_qvdit}
CFG=${CFG:-configs/opensora/qvdit_16x512x512.py}
CKPT=${CKPT:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
CALIB_DIR=${CALIB_DIR:-logs/calib/$EXP_NAME}
CUDA_VISIBLE_DEVICES=$GPU python -m t2v.scripts.export_int "$CFG" --ckpt_path "$CKPT" --calib_dir "$CALIB_DIR" "$@"
