"""How fast the tiny model trains, and whether the host or the GPU limits it: steps per second of the real
`t2v.pipeline.train_tiny.train_step` with the shipped recipe, side by side in one process.

    python bench/bench_train_step.py [--steps 150] [--batch_size 256] [--out logs/bench/train_step.json]

Variants (same model, data and flags; each after its own warm-up, which compiles):
- `sync-free`: the trainer as it runs (the skip of a non-finite update is decided on the device);
- `host sync per step`: the same plus one `.item()` per step, which is what the trainer did before session 8
  (`if not bool(isfinite(grad_norm) & isfinite(loss))`): the host then waits for every step to finish.
It also reports the host (CPU) time per step, measured with the device left to run ahead, and the GPU busy time per
step from torch.profiler, so "CPU-bound" is a number, not a guess.
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


def make_state(batch_size: int, compile_blocks: bool):
    from t2v.pipeline.train_tiny import TrainConfig, caption_token_table, new_state
    from t2v.schedulers.iddpm import IDDPM

    cfg = TrainConfig(device="cuda", batch_size=batch_size, patch_size=(2, 4, 4), loss_weighting="min_snr", lr=5e-4,
                      warmup_steps=100, prediction="v", temporal_pos="input", compile=compile_blocks, eval_prompts=0)
    state = new_state(cfg, torch.device("cuda"))
    if compile_blocks:
        for block in state.module.dit.blocks:
            block.compile()
    token_ids, token_mask = caption_token_table(state.module, torch.device("cuda"))
    return state, IDDPM(num_sampling_steps=1000, prediction=cfg.prediction), token_ids, token_mask


def steps_per_second(state, diffusion, ids, mask, steps: int, sync_each_step: bool) -> tuple[float, float]:
    """(steps/s end to end, host ms per step: the time the Python loop takes to queue the steps)."""
    from t2v.pipeline.train_tiny import train_step

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        terms = train_step(state, diffusion, ids, mask, autocast=True)
        if sync_each_step:
            terms["skipped"].item()
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return steps / total, 1000 * queued / steps


def gpu_busy_ms(state, diffusion, ids, mask, steps: int) -> float:
    """Device time per step summed over kernels (torch.profiler), i.e. what the step costs the GPU alone."""
    from torch.profiler import ProfilerActivity, profile

    from t2v.pipeline.train_tiny import train_step

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(state, diffusion, ids, mask, autocast=True)
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (the first ones compile)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--no_compile", action="store_true", help="eager blocks (default: compiled, as trained)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_step.py times the GPU trainer: no CUDA device here")
    torch.backends.cuda.matmul.allow_tf32 = True
    state, diffusion, ids, mask = make_state(args.batch_size, not args.no_compile)
    compile_start = time.perf_counter()
    steps_per_second(state, diffusion, ids, mask, args.warmup, sync_each_step=False)
    results = {"environment": environment(), "batch_size": args.batch_size, "compiled": not args.no_compile,
               "warmup_s": round(time.perf_counter() - compile_start, 1), "variants": {}}
    for name, sync in (("sync-free", False), ("host sync per step", True), ("sync-free (again)", False)):
        rate, host_ms = steps_per_second(state, diffusion, ids, mask, args.steps, sync)
        results["variants"][name] = {"steps_per_s": round(rate, 2), "videos_per_s": round(rate * args.batch_size),
                                     "host_ms_per_step": round(host_ms, 1)}
    results["gpu_busy_ms_per_step"] = round(gpu_busy_ms(state, diffusion, ids, mask, 20), 1)
    print_and_save(results, args.out)


if __name__ == "__main__":
    main()
