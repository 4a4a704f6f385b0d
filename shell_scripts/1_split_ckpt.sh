#!/usr/bin/env bash
# Stage 1: split the qkv linears of the released OpenSora v1.0 checkpoint. Extra flags pass through
# (e.g. --overwrite, --config config.json).
set -euo pipefail
SRC=${SRC:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512.pth}
DST=${DST:-logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors}
python -m t2v.scripts.split_ckpt --src "$SRC" --dst "$DST" "$@"
