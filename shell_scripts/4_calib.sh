#!/usr/bin/env bash
# Stage 4: calibrate a quantized STDiT (PTQ init + Q-VDiT TQE/TMD distillation) on the stage-3 calibration data.
# Usage: bash shell_scripts/4_calib.sh [GPU_ID] [EXP_NAME] [extra args, e.g. --resume --set distill.iterations=20]
# EXP_NAME picks configs/quant/$EXP_NAME.yaml (default w4a8_qvdit); results go to logs/calib/$EXP_NAME.
# CKPT= (set but empty) builds the model without a checkpoint (the tiny random preset).
set -euo pipefail
GPU=${1:-${GPU:-0}}; shift || true
EXP_NAME=${1:-${EXP_NAME:-w4a8_qvdit}}; shift || true
CFG=${CFG:-configs/opensora/qvdit_16x512x512.py}
CKPT=${CKPT-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
QUANT_CFG=${QUANT_CFG:-configs/quant/$EXP_NAME.yaml}
CALIB_DATA=${CALIB_DATA:-logs/calib_data}
OUTDIR=${OUTDIR:-logs/calib/$EXP_NAME}
EXTRA=()
if [ -n "$CKPT" ]; then EXTRA+=(--ckpt_path "$CKPT"); fi
CUDA_VISIBLE_DEVICES=$GPU python -m t2v.scripts.calib "$CFG" --quant_config "$QUANT_CFG" \
    --calib_data "$CALIB_DATA" --outdir "$OUTDIR" "${EXTRA[@]}" "$@"
