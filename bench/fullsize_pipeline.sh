#!/usr/bin/env bash
# Full-size smoke run of pipeline stages 2-5 with RANDOM weights (issue 4): the real STDiT-XL/2 at 16x512x512, the
# SD VAE's architecture and T5-XXL-width text embeddings, all random (the real OpenSora, T5 and VAE weights cannot
# be downloaded on the GPU machines), through shell_scripts/run_pipeline.sh with shortened settings.
#
#   bash bench/fullsize_pipeline.sh [--report DIR] [--out DIR] [--prompts 2] [--steps 10] [--iters 20]
#        [--methods "w8a8_viditq w4a6_qvdit"] [--depth 28] [--setup_only]
#
# 1. python -m t2v.scripts.make_random_fullsize writes into --random_dir (default logs/fullsize_random; ~3 GB):
#    a random STDiT-XL/2 checkpoint in the split format (stdit-xl2-RANDOM-split.safetensors), random text
#    embeddings of the first --prompts prompts (text_embeds-RANDOM.safetensors, the --precompute_text_embeds
#    format) and the Q-VDiT inference config (DDIM, CFG 4.0, fp32) with that checkpoint and vae.type
#    "sd_vae_random" (the SD VAE's architecture with RANDOM weights).
# 2. run_pipeline.sh --preset opensora-16x512x512 with CFG, NUM_PROMPTS, SAMPLING_STEPS (calibration uses every
#    captured step), DISTILL_ITERS and METHODS: FP inference, calibration data, calibration (W8A8 ViDiT-Q: PTQ with
#    smoothing + rotation; W4A6 Q-VDiT: PTQ + distillation with checkpoint_blocks auto), quantized inference.
# 3. Prints the FP-vs-quantized table and each stage's start time; with --report, copies the table, the log, the
#    calibration reports and the first prompt's contact sheets there (small files only).
# Defaults take about 5-8 minutes on one H100 (80 GB). The videos are noise: this checks that every stage runs at
# full size and how long it takes, not quality. --depth N (N blocks) and --setup_only are for quick checks.
# Needs torch (CUDA), transformers, einops, safetensors, imageio(+ffmpeg), diffusers and mmengine.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=logs/fullsize_pipeline; RANDOM_DIR=logs/fullsize_random; REPORT=""
PROMPTS=2; STEPS=10; ITERS=20; METHODS_ARG="w8a8_viditq w4a6_qvdit"; DEPTH=""; SETUP_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2;;
    --random_dir) RANDOM_DIR=$2; shift 2;;
    --report) REPORT=$2; shift 2;;
    --prompts) PROMPTS=$2; shift 2;;
    --steps) STEPS=$2; shift 2;;
    --iters) ITERS=$2; shift 2;;
    --methods) METHODS_ARG=$2; shift 2;;
    --depth) DEPTH=$2; shift 2;;
    --setup_only) SETUP_ONLY=1; shift;;
    -h|--help) sed -n 2,21p "$0"; exit 0;;
    *) echo "fullsize_pipeline.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done

PY=${PYTHON:-python}
DEPTH_ARGS=()
if [ -n "$DEPTH" ]; then DEPTH_ARGS+=(--depth "$DEPTH"); fi
echo "== [${SECONDS}s] RANDOM-weight stand-ins -> $RANDOM_DIR"
$PY -m t2v.scripts.make_random_fullsize --out "$RANDOM_DIR" --num_prompts "$PROMPTS" "${DEPTH_ARGS[@]}" --overwrite
CKPT=$RANDOM_DIR/stdit-xl2-RANDOM-split.safetensors
EMBEDS=$RANDOM_DIR/text_embeds-RANDOM.safetensors
CONFIG=$RANDOM_DIR/fullsize-RANDOM.py
if [ "$SETUP_ONLY" = 1 ]; then exit 0; fi

mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/pipeline.log
START=$SECONDS
set +e
RUN=$OUT_DIR CFG=$CONFIG NUM_PROMPTS=$PROMPTS SAMPLING_STEPS=$STEPS DISTILL_ITERS=$ITERS METHODS=$METHODS_ARG \
  bash shell_scripts/run_pipeline.sh --preset opensora-16x512x512 --ckpt "$CKPT" --text_embeds "$EMBEDS" 2>&1 \
  | tee "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
echo
echo "== fullsize_pipeline: exit $STATUS after $((SECONDS - START)) s (stages 2-5, $PROMPTS prompts, $STEPS steps," \
     "$ITERS distillation iterations, methods: $METHODS_ARG; RANDOM weights)"
grep -E "^== \[|checkpoint_blocks auto|gradient checkpointing|calibrated: relative|PTQ initialisation: relative" "$LOG" || true
if [ -f "$OUT_DIR/comparison.md" ]; then
  echo; cat "$OUT_DIR/comparison.md"
fi
if [ -n "$REPORT" ]; then
  mkdir -p "$REPORT"
  cp "$LOG" "$REPORT/"
  if [ -f "$OUT_DIR/comparison.md" ]; then cp "$OUT_DIR/comparison.md" "$REPORT/"; fi
  for method in $METHODS_ARG; do
    for f in distill_history.json quant_config.yaml; do
      if [ -f "$OUT_DIR/$method/$f" ]; then cp "$OUT_DIR/$method/$f" "$REPORT/${method}_$f"; fi
    done
    sheet=$(ls "$OUT_DIR/$method/videos/"sample_0000_*.png 2>/dev/null | head -n 1 || true)
    if [ -n "$sheet" ]; then cp "$sheet" "$REPORT/${method}_sample_0000.png"; fi
  done
  sheet=$(ls "$OUT_DIR/fp/"sample_0000_*.png 2>/dev/null | head -n 1 || true)
  if [ -n "$sheet" ]; then cp "$sheet" "$REPORT/fp_sample_0000.png"; fi
  echo "report files in $REPORT"
fi
exit "$STATUS"
