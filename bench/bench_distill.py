"""Speed and memory of Q-VDiT distillation on STDiT-XL/2 at 16x512x512 (issue 4), old vs new, in one process.

Runs the real training loop (`qdiff.distill.trainer.distill`) as stage 4 sets it up: fp32 model, `quantize_model`
with the config (default W3A6 Q-VDiT: TQE 32/1, per-frame scales, learnable Δ, MLPs at W8), the student under
bf16 autocast, the paper's batch of 4 calibration rows, checkpointing over the 28 blocks. Random weights and
random calibration-shaped batches (speed does not depend on the values); the FP targets of the batches are the
model's own fp32 outputs with quantization off, so the losses of all variants are comparable.

Variants (each: warm-up iterations, then the median of timed iterations; every variant starts from the same
TQE/Δ values):
  old            as stage 4 ran before: fp32 teacher forward every iteration, W_eff rebuilt in every layer call
                 (eager autograd chain, again in the checkpoint recompute), every block checkpointed
  targets        + FP targets precomputed once per calibration row (`distill.fp_targets: precompute`)
  targets_fused  + W_eff once per iteration, fused forward + STE backward (`distill.fused_weights`)
  new            + `distill.checkpoint_blocks: auto` (the fewest checkpointed blocks that fit 85% of the GPU)
Stage 4's defaults are `targets` with checkpoint_blocks auto: fused weights measured slower (docs/benchmarks.md).
Whole-calibration estimate per config: PTQ init + (precompute: teacher time per batch × rows / 4) + iterations ×
s/iter, for W3A6 (15,000 it, 20 steps), W4A8 (10,000 it, 100 steps) and W4A6 (10,000 it, 20 steps), 10 prompts,
all at the measured W3A6 iteration time.

    python bench/bench_distill.py --out logs/bench/distill.json
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import build_model, environment, print_and_save  # noqa: E402

VARIANTS = {  # name -> (precomputed targets, DistillConfig overrides, description)
    "old": (False, dict(fused_weights=False, checkpoint_blocks="all"),
            "before: online fp32 teacher, per-call W_eff, all blocks checkpointed"),
    "targets": (True, dict(fused_weights=False, checkpoint_blocks="all"), "+ precomputed FP targets"),
    "targets_fused": (True, dict(fused_weights=True, checkpoint_blocks="all"), "+ W_eff once per iteration (fused)"),
    "new": (True, dict(fused_weights=True, checkpoint_blocks="auto"), "+ checkpoint_blocks auto"),
}
PLANS = {"W3A6 15k": "w3a6_qvdit.yaml", "W4A8 10k": "w4a8_qvdit.yaml", "W4A6 10k": "w4a6_qvdit.yaml"}


def make_batches(batch_size: int, count: int) -> list[dict]:
    """`count` calibration-shaped batches (x [B, 4, 16, 64, 64], timestep [B], y [B, 1, 120, 4096], mask [B, 120])."""
    batches = []
    for iteration in range(count):
        gen = torch.Generator(device="cuda").manual_seed(iteration)
        mask = torch.zeros(batch_size, 120, dtype=torch.long, device="cuda")
        mask[:, :40] = 1
        batches.append({
            "x": torch.randn(batch_size, 4, 16, 64, 64, device="cuda", generator=gen),
            "timestep": torch.randint(0, 1000, (batch_size,), device="cuda", generator=gen),
            "y": torch.randn(batch_size, 1, 120, 4096, device="cuda", generator=gen) * 0.1,
            "mask": mask,
        })
    return batches


def forward(model, batch: dict) -> torch.Tensor:
    return model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"]).float()


@torch.no_grad()
def add_targets(model, batches: list[dict]) -> float:
    """Store the fp32 FP output of every batch as batch["target"]; -> median seconds per teacher forward."""
    from qdiff.api import quant_state

    seconds = []
    with quant_state(model, weight=False, act=False):
        for batch in batches:
            torch.cuda.synchronize()
            start = time.perf_counter()
            batch["target"] = forward(model, batch)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:] or seconds)


def time_variant(model, qcfg, batches: list[dict], warmup: int, precomputed: bool, overrides: dict) -> dict:
    """warmup + timed iterations of `distill` -> median s/iter, peak GiB of the timed iterations, losses."""
    from qdiff.api import quant_state
    from qdiff.distill.trainer import distill

    cfg = dataclasses.replace(qcfg.distill, enabled=True, iterations=len(batches), checkpoint_every=10**6,
                              grad_checkpointing=True, **overrides)
    stamps = []

    def teacher_fn(batch):
        if precomputed:
            return batch["target"]
        with quant_state(model, weight=False, act=False):
            return forward(model, batch)

    def log_fn(entry):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == warmup:
            torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as ckpt_dir:
        result = distill(model, teacher_fn, lambda i: batches[i], cfg, ckpt_dir, progress=False, log_fn=log_fn,
                         student_fn=lambda batch: forward(model, batch), log_every=1, checkpoint_modules=model.blocks)
    losses = [entry["loss"] for entry in result["history"]]
    return {"s_per_iter": statistics.median([b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "checkpointed_blocks": result["checkpointed_blocks"],
            "first_loss": losses[0], "last_loss": losses[-1]}


def plan_hours(res: dict, precomputed: bool, ptq_init_s: float, teacher_s: float, batch_size: int) -> dict:
    """Whole-calibration hours per config of PLANS (10 prompts; the configs' iterations and kept steps)."""
    from qdiff.config import QuantConfig

    hours = {}
    for label, name in PLANS.items():
        qcfg = QuantConfig.from_yaml(REPO / "configs/quant" / name)
        rows = qcfg.calib.n_prompts * qcfg.calib.n_steps * 2
        precompute_s = teacher_s * rows / batch_size if precomputed else 0.0
        hours[label] = (ptq_init_s + precompute_s + qcfg.distill.iterations * res["s_per_iter"]) / 3600
    return hours


def markdown(results: dict) -> str:
    head = ["variant", "what", "s / iteration", "peak GiB", "checkpointed", *PLANS, "loss first → last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results["variants"].items():
        if "error" in res:
            lines.append(f"| {name} | {VARIANTS[name][2]} | {res['error']} |" + " |" * (len(head) - 3))
            continue
        hours = [f"{res['hours'][label]:.2f} h" for label in PLANS]
        lines.append(f"| {name} | {VARIANTS[name][2]} | {res['s_per_iter']:.3f} | {res['peak_gib']:.1f} | "
                     f"{res['checkpointed_blocks']}/{results['num_blocks']} | " + " | ".join(hours) +
                     f" | {res['first_loss']:.4g} → {res['last_loss']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant_config", default=str(REPO / "configs/quant/w3a6_qvdit.yaml"))
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant (>= 1)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    if not torch.cuda.is_available():
        print("bench_distill needs a CUDA GPU", file=sys.stderr)
        return 2

    from qdiff.api import init_weight_quantizers, quantize_model, trainable_parameters
    from qdiff.config import QuantConfig

    qcfg = QuantConfig.from_yaml(args.quant_config)
    model = build_model(torch.float32)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qcfg.distill.seed)
        quantize_model(model, qcfg, adapter="stdit")
    init_weight_quantizers(model)
    torch.cuda.synchronize()
    ptq_init_s = time.perf_counter() - t0
    batches = make_batches(qcfg.distill.batch_size, args.warmup + args.iters)
    teacher_s = add_targets(model, batches)
    groups = trainable_parameters(model)
    start_values = [p.detach().clone() for p in groups["tqe"] + groups["delta"]]
    results = {"quant_config": Path(args.quant_config).name, "batch_size": qcfg.distill.batch_size,
               "num_blocks": len(model.blocks), "ptq_init_s": ptq_init_s, "teacher_s_per_batch": teacher_s,
               "variants": {}}
    print(f"PTQ init {ptq_init_s:.1f} s; fp32 teacher forward {teacher_s:.2f} s per batch", flush=True)

    for name in args.variants.split(","):
        precomputed, overrides, _ = VARIANTS[name]
        with torch.no_grad():  # every variant trains from the same start
            for param, value in zip(groups["tqe"] + groups["delta"], start_values):
                param.copy_(value)
        torch.cuda.empty_cache()
        try:
            res = time_variant(model, qcfg, batches, args.warmup, precomputed, overrides)
            res["hours"] = plan_hours(res, precomputed, ptq_init_s, teacher_s, qcfg.distill.batch_size)
        except torch.OutOfMemoryError as err:
            res = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        results["variants"][name] = res
        print(name, res, flush=True)

    results.update(environment())
    print_and_save(results, args.out)
    print(f"\n### Distillation, STDiT-XL/2 16x512x512, {results['quant_config']}, batch {results['batch_size']} — "
          f"{results['device']}, torch {results['torch']}, {results['date']}\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
