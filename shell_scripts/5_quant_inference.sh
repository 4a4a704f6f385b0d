#!/usr/bin/env bash
# Stage 5: quantized inference with a calibration run's quant params (stage 4's output folder).
# Usage: EXP_NAME=w4a8_qvdit bash shell_scripts/5_quant_inference.sh [GPU_ID] [extra args, e.g. --fold --overwrite]
#        EXP_NAME=w4a8_qvdit bash shell_scripts/5_quant_inference.sh [GPU_ID] --hardware   # real integer kernels,
#        with the integer weights of stage 6 (shell_scripts/6_export_int.sh); videos in $CALIB_DIR/videos_hardware
set -euo pipefail
if [[ $# -gt 0 && $1 != --* ]]; then GPU=$1; shift; else GPU=${GPU:-0}; fi
EXP_NAME=${EXP_NAME:-w4a8_qvdit}
CFG=${CFG:-configs/opensora/qvdit_16x512x512.py}
CKPT=${CKPT:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
CALIB_DIR=${CALIB_DIR:-logs/calib/$EXP_NAME}
VIDEOS=videos
for arg in "$@"; do if [[ $arg == --hardware ]]; then VIDEOS=videos_hardware; fi; done
OUTDIR=${OUTDIR:-$CALIB_DIR/$VIDEOS}
EXTRA=()
if [ -n "${TEXT_EMBEDS:-}" ]; then EXTRA+=(--precompute_text_embeds "$TEXT_EMBEDS"); fi
CUDA_VISIBLE_DEVICES=$GPU python -m t2v.scripts.quant_inference "$CFG" --ckpt_path "$CKPT" --calib_dir "$CALIB_DIR" \
    --outdir "$OUTDIR" "${EXTRA[@]}" "$@"
