"""Speed and memory of Q-VDiT distillation on STDiT-XL/2 at 16x512x512 (issue 4, item 8), in one process.

Runs the real training loop (`qdiff.distill.trainer.distill`) exactly as stage 4 sets it up: fp32 model,
`quantize_model` with the config (default W3A6 Q-VDiT: TQE 32/1, per-frame scales, learnable Δ, MLPs at W8),
the teacher = the same model with quantization switched off, the student under bf16 autocast, the paper's
batch of 4 calibration rows, gradient checkpointing. Batches are random latents/text embeddings of the
calibration shapes (speed does not depend on the values). Random weights.

Variants (each: warm-up iterations, then the median of timed iterations):
  paper        as stage 4 runs it (fp32 teacher, grad checkpointing)
  tf32_teacher the teacher's fp32 matmuls on TF32 tensor cores
  no_ckpt      without gradient checkpointing (memory permitting)
Extrapolates the whole calibration: iterations × s/iter (+ measured PTQ initialisation).

    python bench/bench_distill.py --out logs/bench/distill.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import build_model, environment, print_and_save  # noqa: E402


def make_batches(batch_size: int, device: str):
    """iteration -> a calibration-shaped batch (x [B, 4, 16, 64, 64], timestep [B], y [B, 1, 120, 4096], mask)."""
    def batches(iteration: int) -> dict:
        gen = torch.Generator(device=device).manual_seed(iteration)
        mask = torch.zeros(batch_size, 120, dtype=torch.long, device=device)
        mask[:, :40] = 1
        return {
            "x": torch.randn(batch_size, 4, 16, 64, 64, device=device, generator=gen),
            "timestep": torch.randint(0, 1000, (batch_size,), device=device, generator=gen),
            "y": torch.randn(batch_size, 1, 120, 4096, device=device, generator=gen) * 0.1,
            "mask": mask,
        }
    return batches


def time_distill(model, qcfg, iterations: int, warmup: int, grad_checkpointing: bool) -> dict:
    """Run warmup + iterations of `distill`; -> seconds per iteration (median) and peak GiB."""
    import dataclasses

    from qdiff.api import quant_state
    from qdiff.distill.trainer import distill

    cfg = dataclasses.replace(qcfg.distill, enabled=True, iterations=warmup + iterations,
                              checkpoint_every=10**6, grad_checkpointing=grad_checkpointing)
    batches = make_batches(cfg.batch_size, "cuda")
    stamps = []

    def forward(batch):
        return model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"]).float()

    def teacher_fn(batch):
        with quant_state(model, weight=False, act=False):
            return forward(batch)

    def log_fn(entry):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model.enable_gradient_checkpointing(grad_checkpointing)
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as ckpt_dir:
        result = distill(model, teacher_fn, batches, cfg, ckpt_dir, progress=False, log_fn=log_fn,
                         student_fn=forward, log_every=1)
    model.enable_gradient_checkpointing(False)
    per_iter = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    losses = [h["loss"] for h in result["history"]]
    return {"s_per_iter": statistics.median(per_iter), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant_config", default=str(REPO / "configs/quant/w3a6_qvdit.yaml"))
    p.add_argument("--iters", type=int, default=4, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default="paper,tf32_teacher,no_ckpt")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_distill needs a CUDA GPU", file=sys.stderr)
        return 2

    from qdiff.api import init_weight_quantizers, quantize_model
    from qdiff.config import QuantConfig

    qcfg = QuantConfig.from_yaml(args.quant_config)
    model = build_model(torch.float32)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qcfg.distill.seed)
        quantize_model(model, qcfg, adapter="stdit")
    init_weight_quantizers(model)
    torch.cuda.synchronize()
    results = {"quant_config": Path(args.quant_config).name, "batch_size": qcfg.distill.batch_size,
               "iterations_config": qcfg.distill.iterations, "ptq_init_s": time.perf_counter() - t0, "variants": {}}
    print(f"PTQ init (quantize + grid search): {results['ptq_init_s']:.1f} s", flush=True)

    for name in args.variants.split(","):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32_teacher"
        try:
            res = time_distill(model, qcfg, args.iters, args.warmup, grad_checkpointing=name != "no_ckpt")
        except torch.OutOfMemoryError as err:
            res = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            torch.cuda.empty_cache()
        if "s_per_iter" in res:
            res["full_calibration_h"] = (results["ptq_init_s"] + res["s_per_iter"] * qcfg.distill.iterations) / 3600
        results["variants"][name] = res
        print(name, json.dumps(res), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    results.update(environment())
    print_and_save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
