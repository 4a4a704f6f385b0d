"""How fast the tiny model trains, and whether the host or the GPU limits it: steps per second of the real
`t2v.pipeline.train_tiny.train_step` with the shipped recipe, side by side in one process.

    python bench/bench_train_step.py [--steps 150] [--batch_size 256] [--out logs/bench/train_step.json]

Variants (same model, data and flags; each with its own compile and warm-up):
- `blocks, packed text`: each STDiT block compiled, the text packed (what trained the model up to session 8: one
  host sync per forward for the text lengths, and block inputs whose shapes change with every batch);
- `blocks, packed text, host sync per step`: the same plus the trainer's old per-step `.item()` skip check;
- `blocks, padded text`: `--compile true` since session 8 (fixed shapes, no host sync);
- `loss, padded text`: `--compile_scope loss`, the text encoder, DiT and loss as one compiled graph;
- `loss, padded text, CUDA graphs`: the same with `--compile_mode reduce-overhead` (forward and backward replayed
  as CUDA graphs);
- `loss, padded text, host sync per step`: variant 4 waiting for the device once per step (what the trainer did
  before session 12 removed the host-to-device copies of its data tables and IDDPM arrays);
- `loss, padded text, math attention` (and `, CUDA graphs`): `--attention math`, every attention as matmul-softmax-
  matmul instead of SDPA's kernels.
Each reports steps/s and the host milliseconds to queue one step (the device left to run ahead), and the GPU
busy time per step from torch.profiler, so "host-bound" is a number, not a guess.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import environment, print_and_save  # noqa: E402


def make_state(batch_size: int, scope: str, padded_text: bool, mode: str = "default", attention: str = "sdpa"):
    from t2v.pipeline.train_tiny import TrainConfig, caption_token_table, compile_for_training, new_state
    from t2v.schedulers.iddpm import IDDPM

    torch._dynamo.reset()
    cfg = TrainConfig(device="cuda", batch_size=batch_size, patch_size=(2, 4, 4), loss_weighting="min_snr", lr=5e-4,
                      warmup_steps=100, prediction="v", temporal_pos="input", eval_prompts=0,
                      compile=True, compile_scope=scope, compile_mode=mode, attention=attention)
    state = new_state(cfg, torch.device("cuda"))
    loss_fn = compile_for_training(cfg, state.module)  # what `train` runs
    state.module.dit.static_block_inputs = padded_text  # the packed-text variants: as the trainer before session 8
    token_ids, token_mask = caption_token_table(state.module, torch.device("cuda"))
    diffusion = IDDPM(num_sampling_steps=1000, prediction=cfg.prediction).to("cuda")  # as `train` does
    return state, diffusion, token_ids, token_mask, loss_fn


def steps_per_second(state, diffusion, ids, mask, loss_fn, steps: int, sync_each_step: bool) -> tuple[float, float]:
    """(steps/s end to end, host ms per step: the time the Python loop takes to queue the steps)."""
    from t2v.pipeline.train_tiny import train_step

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        terms = train_step(state, diffusion, ids, mask, autocast=True, loss_fn=loss_fn)
        if sync_each_step:
            terms["skipped"].item()
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return steps / total, 1000 * queued / steps


def gpu_busy_ms(state, diffusion, ids, mask, loss_fn, steps: int, top: int = 0) -> float:
    """Device time per step summed over kernels (torch.profiler), i.e. what the step costs the GPU alone; prints the
    `top` kernels by device time per step."""
    from torch.profiler import ProfilerActivity, profile

    from t2v.pipeline.train_tiny import train_step

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(state, diffusion, ids, mask, autocast=True, loss_fn=loss_fn)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total_us = sum(e.self_device_time_total for e in events)
    for event in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {event.self_device_time_total / 1000 / steps:7.2f} ms  x{event.count // steps:<4d} {event.key[:100]}")
    return total_us / 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (the first ones compile)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--only", default="", help="comma-separated variant numbers (1-8) to run; default all")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--top", type=int, default=0, help="print the N kernels with the most device time per step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_step.py times the GPU trainer: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = True
    variants = [("blocks, packed text", "blocks", False, False, "default", "sdpa"),
                ("blocks, packed text, host sync per step", "blocks", False, True, "default", "sdpa"),
                ("blocks, padded text", "blocks", True, False, "default", "sdpa"),
                ("loss, padded text", "loss", True, False, "default", "sdpa"),
                ("loss, padded text, CUDA graphs", "loss", True, False, "reduce-overhead", "sdpa"),
                ("loss, padded text, host sync per step", "loss", True, True, "default", "sdpa"),
                ("loss, padded text, math attention", "loss", True, False, "default", "math"),
                ("loss, padded text, math attention, CUDA graphs", "loss", True, False, "reduce-overhead", "math")]
    chosen = {int(n) for n in args.only.split(",") if n} or set(range(1, len(variants) + 1))
    results = {"environment": environment(), "batch_size": args.batch_size, "variants": {}}
    for number, (name, scope, padded, sync, mode, attention) in enumerate(variants, 1):
        if number not in chosen:
            continue
        state, diffusion, ids, mask, loss_fn = make_state(args.batch_size, scope, padded, mode, attention)
        start = time.perf_counter()
        steps_per_second(state, diffusion, ids, mask, loss_fn, args.warmup, sync_each_step=False)
        warmup_s = time.perf_counter() - start
        rate, host_ms = steps_per_second(state, diffusion, ids, mask, loss_fn, args.steps, sync)
        results["variants"][name] = {
            "steps_per_s": round(rate, 2), "videos_per_s": round(rate * args.batch_size),
            "host_ms_per_step": round(host_ms, 1), "warmup_s": round(warmup_s, 1),
            "gpu_busy_ms_per_step": round(gpu_busy_ms(state, diffusion, ids, mask, loss_fn, 10, args.top), 1)}
        print(name, results["variants"][name], flush=True)
        del state
        torch.cuda.empty_cache()
    print_and_save(results, args.out)


if __name__ == "__main__":
    main()
