#!/usr/bin/env bash
# Stage 3: capture calibration data (DiT inputs along the FP sampling trajectory) for the first 10 prompts.
# Usage: bash shell_scripts/3_get_calib_data.sh [GPU_ID] [extra args, e.g. --overwrite --x_dtype float32]
set -euo pipefail
GPU=${1:-${GPU:-0}}; shift || true
CFG=${CFG:-configs/opensora/qvdit_16x512x512.py}
CKPT=${CKPT:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
OUTDIR=${OUTDIR:-logs/calib_data}
EXTRA=()
if [ -n "${TEXT_EMBEDS:-}" ]; then EXTRA+=(--precompute_text_embeds "$TEXT_EMBEDS"); fi
CUDA_VISIBLE_DEVICES=$GPU python -m t2v.scripts.get_calib_data "$CFG" --ckpt_path "$CKPT" --outdir "$OUTDIR" \
    "${EXTRA[@]}" "$@"
