#!/usr/bin/env bash
# Stage 2: floating-point inference on the prompt file. Usage: bash shell_scripts/2_fp16_inference.sh [GPU_ID] [extra args]
set -euo pipefail
GPU=${1:-${GPU:-0}}; shift || true
CFG=${CFG:-configs/opensora/16x512x512.py}
CKPT=${CKPT:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
OUTDIR=${OUTDIR:-logs/fp16_inference}
EXTRA=()
if [ -n "${TEXT_EMBEDS:-}" ]; then EXTRA+=(--precompute_text_embeds "$TEXT_EMBEDS"); fi
CUDA_VISIBLE_DEVICES=$GPU python -m t2v.scripts.inference "$CFG" --ckpt_path "$CKPT" --outdir "$OUTDIR" "${EXTRA[@]}" "$@"
