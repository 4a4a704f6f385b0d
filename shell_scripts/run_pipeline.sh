#!/usr/bin/env bash
# The whole chain: FP inference -> calibration data -> calibration (+distillation) -> quantized inference for
# each method -> a table comparing every quantized run with FP.
#
#   bash shell_scripts/run_pipeline.sh --preset tiny                      # CPU, a few minutes: the trained shapes model
#   bash shell_scripts/run_pipeline.sh --preset tiny-random               # the same chain on a random tiny model
#   bash shell_scripts/run_pipeline.sh --preset opensora-16x512x512 \
#        --ckpt logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors [--text_embeds FILE]
#
# Env overrides: RUN (output folder), METHODS (quant config names in configs/quant/), GPU, and for shortened runs
# (bench/fullsize_pipeline.sh): CFG (inference config), NUM_PROMPTS (prompts; also calib.n_prompts),
# SAMPLING_STEPS (stages 2, 3, 5; calibration then uses every captured step: calib.n_steps), DISTILL_ITERS.
set -euo pipefail

PRESET=tiny; CKPT=""; TEXT_EMBEDS=""; CFG_ENV=${CFG:-}; TINY_STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET=$2; shift 2;;
    --ckpt) CKPT=$2; shift 2;;
    --text_embeds) TEXT_EMBEDS=$2; shift 2;;
    -h|--help) sed -n 2,13p "$0"; exit 0;;
    *) echo "run_pipeline.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done

case "$PRESET" in
  tiny|tiny-random)
    # tiny: the shapes model trained here (checkpoints/tiny_t2v); tiny-random: a random tiny STDiT, T5 and VAE.
    # Both: 3 prompts, 20 DDIM steps (10 of them calibrate), a short distillation with a larger learning rate.
    if [ "$PRESET" = tiny ]; then CFG=configs/opensora/tiny_trained_qvdit.py; else CFG=configs/opensora/tiny_qvdit.py; fi
    RUN=${RUN:-logs/pipeline_$PRESET}
    METHODS=${METHODS:-"w8a8_ptq w4a8_viditq w4a6_qvdit"}
    NPROMPTS=3
    TINY_STEPS=20
    QUANT_SET=(--set calib.n_steps=10 --set calib.n_prompts=3 --set distill.iterations=60 --set distill.lr=5e-4 --set distill.checkpoint_every=30)
    ;;
  opensora-16x512x512)
    CFG=configs/opensora/qvdit_16x512x512.py
    RUN=${RUN:-logs/pipeline_opensora}
    METHODS=${METHODS:-"w8a8_viditq w4a8_viditq w4a8_qvdit w3a6_qvdit"}
    NPROMPTS=10
    QUANT_SET=()
    if [ -z "$CKPT" ]; then echo "run_pipeline.sh: --preset opensora-16x512x512 needs --ckpt SPLIT_CHECKPOINT" >&2; exit 2; fi
    ;;
  *) echo "run_pipeline.sh: unknown preset $PRESET (tiny | tiny-random | opensora-16x512x512)" >&2; exit 2;;
esac

CFG=${CFG_ENV:-$CFG}
if [ -n "${NUM_PROMPTS:-}" ]; then NPROMPTS=$NUM_PROMPTS; QUANT_SET+=(--set "calib.n_prompts=$NUM_PROMPTS"); fi
SAMPLE=()
if [ -n "${TINY_STEPS:-}" ] && [ -z "${SAMPLING_STEPS:-}" ]; then SAMPLE+=(--num_sampling_steps "$TINY_STEPS"); fi
if [ -n "${SAMPLING_STEPS:-}" ]; then
  SAMPLE+=(--num_sampling_steps "$SAMPLING_STEPS"); QUANT_SET+=(--set "calib.n_steps=$SAMPLING_STEPS")
fi
if [ -n "${DISTILL_ITERS:-}" ]; then QUANT_SET+=(--set "distill.iterations=$DISTILL_ITERS"); fi

COMMON=()  # every stage
if [ -n "$CKPT" ]; then COMMON+=(--ckpt_path "$CKPT"); fi
TEXT=()  # the sampling stages (2, 3, 5); stage 4 reads the embeddings stored in the calibration data
if [ -n "$TEXT_EMBEDS" ]; then TEXT+=(--precompute_text_embeds "$TEXT_EMBEDS"); fi
export CUDA_VISIBLE_DEVICES=${GPU:-${CUDA_VISIBLE_DEVICES:-0}}

echo "== [${SECONDS}s] stage 2: FP inference -> $RUN/fp"
python -m t2v.scripts.inference "$CFG" "${COMMON[@]}" "${TEXT[@]}" "${SAMPLE[@]}" --outdir "$RUN/fp" --num_prompts "$NPROMPTS" --overwrite
echo "== [${SECONDS}s] stage 3: calibration data -> $RUN/calib_data"
python -m t2v.scripts.get_calib_data "$CFG" "${COMMON[@]}" "${TEXT[@]}" "${SAMPLE[@]}" --outdir "$RUN/calib_data" \
  --data_num "$NPROMPTS" --overwrite
RUNS=()
for method in $METHODS; do
  echo "== [${SECONDS}s] stage 4: calibration $method -> $RUN/$method"
  python -m t2v.scripts.calib "$CFG" "${COMMON[@]}" --quant_config "configs/quant/$method.yaml" \
    --calib_data "$RUN/calib_data" --outdir "$RUN/$method" --overwrite --no_progress "${QUANT_SET[@]}"
  echo "== [${SECONDS}s] stage 5: quantized inference $method -> $RUN/$method/videos"
  python -m t2v.scripts.quant_inference "$CFG" "${COMMON[@]}" "${TEXT[@]}" "${SAMPLE[@]}" --calib_dir "$RUN/$method" \
    --outdir "$RUN/$method/videos" --num_prompts "$NPROMPTS" --overwrite
  RUNS+=("$RUN/$method/videos")
done
echo "== [${SECONDS}s] FP vs quantized"
python -m t2v.scripts.compare_videos "$RUN/fp" "${RUNS[@]}" --names $METHODS --out "$RUN/comparison.md" --overwrite
