"""Speed and memory of Q-VDiT distillation on STDiT-XL/2 at 16x512x512 (issue 4), variants side by side in one process.

Runs the real training loop (`qdiff.distill.trainer.distill`) as stage 4 sets it up: fp32 model, `quantize_model`
with the config (default W3A6 Q-VDiT: TQE 32/1, per-frame scales, learnable Δ, MLPs at W8), the student under
bf16 autocast, the paper's batch of 4 calibration rows, checkpointing over the 28 blocks. Random weights and
random calibration-shaped batches (speed does not depend on the values); the FP targets of the batches are the
model's own fp32 outputs with quantization off, so the losses of all variants are comparable.

Variants (each: warm-up iterations, then the median of timed iterations; every variant starts from the same
TQE/Δ values; one variant failing, e.g. out of memory or a compile error, is reported in its row and the others
still run):
  all       eager (`distill.compile: false`), precomputed FP targets, W_eff per layer call, every block
            checkpointed: what `checkpoint_blocks: auto` chose before issue 4's fix (2.01 s/iteration, session 3)
  auto      eager, `checkpoint_blocks: auto` with the fixed probe (as many blocks unchecked as fit
            `checkpoint_memory_fraction` = 85% of the GPU; the chosen count and the per-block cost are reported):
            stage 4's defaults before session 19
  compile   auto + compiled blocks (torch.compile(dynamic=False) of every block; compile time is in the warm-up,
            and in the probe), with the default `compile_memory_budget` (0.5): stage 4's defaults on CUDA since
            session 19 (`distill.compile: auto` compiles runs of 1,000 iterations or more)
  compile_full  (on request) compile with `compile_memory_budget: 1.0`: each compiled block saves what the
            partitioner likes (session 12-17's compile: 1.09-1.11 s/iteration on an H100, 14 of 28 blocks unchecked)
  auto_math, compile_sdpa, compile_packed  (on request) auto with the temporal attention as "math"; compile
            with it as SDPA; compile with the valid text tokens packed instead of padded (it compiles again for
            every new set of text lengths, so time it with --text_lengths fixed). Stage 4 compiles with padded text
            and the "math" temporal attention (`t2v.pipeline.ptq.distill_settings`), and so do the other variants
  old       (on request) session 2's: fp32 teacher forward every iteration, every block checkpointed
  fused     (on request) all + `distill.fused_weights` (W_eff once per iteration)
Under torchrun each rank runs `--rows_per_rank` rows (default: the config's batch over the ranks, so the global
batch stays 4) and the trainer averages the gradients (DDP); the table has the world size in every row. With more
ranks than GPUs the ranks share them over gloo: a functional check of the DDP path whose timings mean nothing.

Whole-calibration estimate per config: PTQ init + (precompute: teacher time per batch × rows / 4) + iterations ×
s/iter, for W3A6 (15,000 it, 20 steps), W4A8 (10,000 it, 100 steps) and W4A6 (10,000 it, 20 steps), 10 prompts,
all at the measured W3A6 iteration time. TFLOP/s per GPU: the iteration's GEMM + attention FLOPs counted from
the model's shapes (`--flops` prints the breakdown; no GPU needed) over the measured time.

    python bench/bench_distill.py --out $OUT/distill.json                      # all, auto, compile
    torchrun --nproc_per_node 2 bench/bench_distill.py --variants all,auto --out $OUT/distill_ddp2.json
    python bench/bench_distill.py --flops                                       # the FLOP floor, on a CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
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
    "all": (True, dict(fused_weights=False, checkpoint_blocks="all", compile=False),
            "eager, every block checkpointed (auto before the fix)"),
    "auto": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=False),
             "checkpoint_blocks auto, eager (stage 4 before session 19)"),
    "compile": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=True),
                "stage-4 defaults on CUDA: auto + compiled blocks, compile_memory_budget 0.5"),
    "compile_full": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=True,
                                compile_memory_budget=1.0), "compile, compile_memory_budget 1.0 (before session 18)"),
    "auto_math": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=False,
                             settings=dict(temporal_attention="math")),
                  "auto with the temporal attention as math (what compile trains with)"),
    "compile_sdpa": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=True,
                                settings=dict(temporal_attention="sdpa")),
                     "compile with the temporal attention as SDPA (session 18)"),
    "compile_packed": (True, dict(fused_weights=False, checkpoint_blocks="auto", compile=True,
                                  settings=dict(static_block_inputs=False)),
                       "compile with packed text (before session 19: recompiles for new text lengths)"),
    "old": (False, dict(fused_weights=False, checkpoint_blocks="all", compile=False),
            "online fp32 teacher, all checkpointed"),
    "fused": (True, dict(fused_weights=True, checkpoint_blocks="all", compile=False),
              "all + W_eff once per iteration (fused)"),
}
DEFAULT_VARIANTS = "all,auto,compile"
PLANS = {"W3A6 15k": "w3a6_qvdit.yaml", "W4A8 10k": "w4a8_qvdit.yaml", "W4A6 10k": "w4a6_qvdit.yaml"}
GIB = 2**30


# ------------------------------------------------------------------------------ FLOPs from the model's shapes
def distill_flops(rows: int = 4, text_tokens: int = 120, checkpointed: int = 28, rank: int = 32,
                  input_size=(16, 64, 64)) -> dict:
    """FLOPs of one distillation iteration of STDiT-XL/2 (multiply-add = 2), counted on the meta device.

    A forward of the real module tree on meta tensors, with a hook on every nn.Linear (M·K·N of each call)
    and torch's FlopCounterMode for the attention products (q·kᵀ and p·v of spatial, temporal and cross
    attention); `text_tokens` valid text tokens per row (120 = every token, the upper bound). The backward
    follows what distillation differentiates: every quantized linear (the 13 per block; the embedders and the
    final layer are FP, `remain_fp.txt`) needs dL/dW_eff, because W_eff depends on the trainable Δ, B·A and
    b_out·a_out (2·M·K·N); dL/dX (2·M·K·N) wherever its input depends on a trainable tensor: every block linear
    except `cross_attn.kv_linear` (its input is the frozen caption path) and block 0's spatial q/k/v (their
    input is the frozen patch embedding), and the final layer (dX only). Attention backward: dQ, dK, dV, dP,
    twice the forward's products (flash attention recomputes q·kᵀ as well: +0.5×, listed apart).
    Checkpointing recomputes the forward of `checkpointed` blocks. The TQE chain per layer call: B·A
    (2·d_out·r·d_in) forward, dB and dA backward, and again in the recompute.
    Returns a dict of FLOPs by part, with "total" and "total_no_recompute".
    """
    from torch.utils.flop_counter import FlopCounterMode

    from t2v.models.stdit import STDiT_XL_2

    with torch.device("meta"):
        model = STDiT_XL_2(input_size=input_size).eval()
        x = torch.empty(rows, 4, *input_size)
        timestep = torch.zeros(rows)
        y = torch.empty(rows, 1, text_tokens, 4096)  # only the valid tokens: the model packs exactly these
    linear = {}

    def hook(name):
        def record(module, inputs, output):
            tokens = inputs[0].numel() // inputs[0].shape[-1]
            linear[name] = linear.get(name, 0) + 2 * tokens * module.in_features * module.out_features
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, timestep, y, mask=None)
    for handle in handles:
        handle.remove()
    counts = counter.get_flop_counts()
    num_blocks = len(model.blocks)
    attention = sum(sum(v for op, v in ops.items() if "bmm" in str(op) or "attention" in str(op))
                    for module, ops in counts.items() if module.count(".") == 3 and ".blocks." in module)

    def in_blocks(name):
        return name.startswith("blocks.")

    def needs_dx(name):
        if name.startswith("final_layer."):
            return True
        if not in_blocks(name) or name.endswith("cross_attn.kv_linear"):
            return False
        return not any(name == f"blocks.0.attn.{p}" for p in "qkv")

    block_linear = sum(v for n, v in linear.items() if in_blocks(n))
    quant_weights = sum(m.in_features * m.out_features for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and in_blocks(n))
    chain = 2 * rank * quant_weights  # B·A per layer call
    parts = {
        "forward: linears in blocks": block_linear,
        "forward: linears outside blocks (FP)": sum(v for n, v in linear.items() if not in_blocks(n)),
        "forward: attention products": attention,
        "backward: dL/dX of linears": sum(v for n, v in linear.items() if needs_dx(n)),
        "backward: dL/dW_eff of quantized linears": block_linear,
        "backward: attention (dQ, dK, dV, dP)": 2 * attention,
        "recompute: checkpointed blocks' forward": checkpointed / num_blocks * (block_linear + attention),
        "TQE chain B·A (forward, recompute, dB, dA)": chain * (3 + checkpointed / num_blocks),
    }
    fa_recompute = 0.5 * attention
    total = sum(parts.values())
    return {"parts": parts, "flash_attention_recompute": fa_recompute, "total": total,
            "total_no_recompute": total - parts["recompute: checkpointed blocks' forward"]
            - chain * checkpointed / num_blocks,
            "forward_per_row": (parts["forward: linears in blocks"] + parts["forward: linears outside blocks (FP)"]
                                + attention) / rows,
            "rows": rows, "text_tokens": text_tokens, "checkpointed": checkpointed, "num_blocks": num_blocks,
            "linears_per_block": sum(1 for n in linear if n.startswith("blocks.0.")),
            "tokens_per_row": model.num_temporal * model.num_spatial}


def flops_report(tflops_per_s: float = 600.0, iterations: int = 15_000) -> str:
    """The markdown breakdown of `distill_flops` at the paper's settings and what it implies."""
    res = distill_flops()
    lines = [f"STDiT-XL/2, latent [4, 16, 64, 64] -> {res['tokens_per_row']:,} tokens per row, batch {res['rows']} "
             f"rows, {res['num_blocks']} blocks x {res['linears_per_block']} linears, {res['text_tokens']} text tokens; "
             f"forward of one row {res['forward_per_row'] / 1e12:.2f} TFLOP", "",
             "| part | TFLOP per iteration |", "|---|---|"]
    for name, value in res["parts"].items():
        lines.append(f"| {name} | {value / 1e12:.2f} |")
    lines.append(f"| **total, every block checkpointed** | **{res['total'] / 1e12:.1f}** |")
    lines.append(f"| total without recompute | {res['total_no_recompute'] / 1e12:.1f} |")
    lines.append(f"| (flash attention's recompute of q·kᵀ in its backward, not included) | "
                 f"{res['flash_attention_recompute'] / 1e12:.2f} |")
    for label, total in (("checkpointed", res["total"]), ("no recompute", res["total_no_recompute"])):
        seconds = total / (tflops_per_s * 1e12)
        lines.append(f"\nAt {tflops_per_s:.0f} TFLOP/s ({label}): {seconds:.3f} s/iteration, "
                     f"{iterations:,} iterations = {seconds * iterations / 3600:.2f} h")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the timed runs
def make_batches(batch_size: int, count: int, rank: int = 0, text_lengths: str = "varied") -> list[dict]:
    """`count` calibration-shaped batches (x [B, 4, 16, 64, 64], timestep [B], y [B, 1, 120, 4096], mask [B, 120]).
    text_lengths: "fixed" (40 valid tokens in every row, sessions 1-19) or "varied" (each row's count drawn from
    10..60, as the prompts of a calibration set differ)."""
    batches = []
    for iteration in range(count):
        gen = torch.Generator(device="cuda").manual_seed(iteration + 7919 * rank)
        if text_lengths == "fixed":
            lengths = torch.full((batch_size, 1), 40, device="cuda")
        else:
            lengths = torch.randint(10, 61, (batch_size, 1), device="cuda", generator=gen)
        mask = (torch.arange(120, device="cuda") < lengths).long()
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
    """warmup + timed iterations of `distill` -> median s/iter, peak GiB of the timed iterations, losses, plan."""
    from qdiff.api import quant_state
    from qdiff.distill.trainer import distill
    from t2v.models.stdit import run_settings
    from t2v.pipeline.ptq import distill_settings

    overrides = dict(overrides)
    settings = overrides.pop("settings", {})
    cfg = dataclasses.replace(qcfg.distill, enabled=True, iterations=len(batches), checkpoint_every=10**6,
                              grad_checkpointing=True, **overrides)
    settings = {**distill_settings(cfg, "cuda"), **settings}
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

    with tempfile.TemporaryDirectory() as ckpt_dir, run_settings(model, **settings):
        result = distill(model, teacher_fn, lambda i: batches[i], cfg, ckpt_dir, progress=False, log_fn=log_fn,
                         student_fn=lambda batch: forward(model, batch), log_every=1, checkpoint_modules=model.blocks)
    losses = [entry["loss"] for entry in result["history"]]
    plan = result["checkpoint_plan"]
    return {"s_per_iter": statistics.median([b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]),
            "peak_gib": torch.cuda.max_memory_allocated() / GIB, "checkpointed_blocks": result["checkpointed_blocks"],
            "per_block_gib": None if plan.per_block is None else plan.per_block / GIB,
            "budget_gib": None if plan.budget is None else plan.budget / GIB,
            "plan": plan.describe() if plan.budget is not None else "",
            "first_loss": losses[0], "last_loss": losses[-1]}


KERNEL_CATEGORIES = (  # (category, substrings of the lower-cased kernel name), first match wins
    ("attention (SDPA)", ("flash", "fmha", "attention", "sdpa")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "sm90_")),
    ("elementwise and reductions (torch)", ("elementwise", "reduce", "norm", "softmax", "vectorized", "pointwise",
                                            "unrolled")),
    ("copies and layout", ("copy", "cat", "transpose", "index", "gather", "scatter", "fill", "memcpy", "memset")),
    ("Triton (qdiff kernels, inductor)", ("triton", "fake_quant", "frame_rank1", "act_quant", "codes_projection",
                                          "int_gemm")),
)


def profile_variant(model, qcfg, batches: list[dict], precomputed: bool, overrides: dict, steps: int = 2) -> dict:
    """GPU kernel time of `steps` distillation iterations (torch.profiler) -> (ms per iteration by category,
    the 25 longest kernels in ms per iteration)."""
    from torch.profiler import ProfilerActivity, profile

    time_variant(model, qcfg, batches[:2], 1, precomputed, overrides)  # warm (and, with compile, compiled)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_variant(model, qcfg, batches[:steps + 1], 1, precomputed, overrides)
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0.0)
        if not micros or str(getattr(event, "device_type", "")).endswith("CPU"):
            continue
        name = event.key.lower()
        category = next((cat for cat, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        totals[category] = totals.get(category, 0.0) + micros / 1000 / (steps + 1)
        kernels[event.key[:120]] = kernels.get(event.key[:120], 0.0) + micros / 1000 / (steps + 1)
    top = dict(sorted(kernels.items(), key=lambda item: -item[1])[:25])
    return dict(sorted(totals.items(), key=lambda item: -item[1])), top


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
    head = ["variant", "what", "GPUs × rows", "s / iteration", "TFLOP/s per GPU", "peak GiB", "checkpointed",
            "GiB / unchecked block", *PLANS, "loss first → last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    layout = f"{results['world_size']} × {results['rows_per_rank']}"
    for name, res in results["variants"].items():
        if "error" in res:
            lines.append(f"| {name} | {VARIANTS[name][2]} | {layout} | {res['error']} |" + " |" * (len(head) - 4))
            continue
        hours = [f"{res['hours'][label]:.2f} h" for label in PLANS]
        per_block = "–" if res["per_block_gib"] is None else f"{res['per_block_gib']:.2f}"
        lines.append(f"| {name} | {VARIANTS[name][2]} | {layout} | {res['s_per_iter']:.3f} | {res['tflops']:.0f} | "
                     f"{res['peak_gib']:.1f} | {res['checkpointed_blocks']}/{results['num_blocks']} | {per_block} | "
                     + " | ".join(hours) + f" | {res['first_loss']:.4g} → {res['last_loss']:.4g} |")
    return "\n".join(lines)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}".replace("|", "/")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant_config", default=str(REPO / "configs/quant/w3a6_qvdit.yaml"))
    p.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant (>= 1)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--text_lengths", choices=("varied", "fixed"), default="varied",
                   help="valid text tokens per row: drawn from 10..60 per row (varied) or 40 everywhere (fixed, "
                        "the benches before session 19)")
    p.add_argument("--rows_per_rank", type=int, default=None,
                   help="calibration rows per rank and iteration (default: the config's batch / world size)")
    p.add_argument("--profile", default=None, metavar="VARIANT",
                   help="also profile this variant's kernels by category (ms of GPU time per iteration)")
    p.add_argument("--flops", action="store_true", help="only print the FLOP count of an iteration (CPU, meta device)")
    p.add_argument("--tflops", type=float, default=600.0, help="assumed bf16 throughput for --flops (TFLOP/s)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.flops:
        print(flops_report(args.tflops))
        return 0
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    if args.profile is not None and args.profile not in VARIANTS:
        p.error(f"--profile: unknown variant {args.profile!r}; choose from {list(VARIANTS)}")
    if not torch.cuda.is_available():
        print("bench_distill needs a CUDA GPU (--flops runs anywhere)", file=sys.stderr)
        return 2

    from qdiff.api import init_weight_quantizers, quantize_model, trainable_parameters
    from qdiff.config import QuantConfig
    from t2v.pipeline.distributed import destroy_process_group_if_needed, init_process_group_if_needed, world

    rank, world_size = world()
    shared_gpu = 1 < world_size and torch.cuda.device_count() < world_size
    if shared_gpu:  # more ranks than GPUs: a functional check of the DDP path only (gloo, ranks share GPUs)
        import datetime

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    else:
        init_process_group_if_needed("cuda", timeout_minutes=10)  # torchrun: NCCL, this rank's GPU
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    qcfg = QuantConfig.from_yaml(args.quant_config)
    rows = args.rows_per_rank or max(1, qcfg.distill.batch_size // world_size)
    model = build_model(torch.float32)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(qcfg.distill.seed)
        quantize_model(model, qcfg, adapter="stdit")
    init_weight_quantizers(model)
    torch.cuda.synchronize()
    ptq_init_s = time.perf_counter() - t0
    batches = make_batches(rows, args.warmup + args.iters, rank, args.text_lengths)
    teacher_s = add_targets(model, batches)
    groups = trainable_parameters(model)
    start_values = [p.detach().clone() for p in groups["tqe"] + groups["delta"]]
    results = {"quant_config": Path(args.quant_config).name, "batch_size": rows * world_size, "rows_per_rank": rows,
               "world_size": world_size, "shared_gpu": shared_gpu, "num_blocks": len(model.blocks),
               "ptq_init_s": ptq_init_s, "teacher_s_per_batch": teacher_s, "text_lengths": args.text_lengths,
               "variants": {}}
    if rank == 0:
        print(f"PTQ init {ptq_init_s:.1f} s; fp32 teacher forward {teacher_s:.2f} s per batch of {rows}; "
              f"{world_size} rank(s) x {rows} rows", flush=True)

    for name in names:
        precomputed, overrides, _ = VARIANTS[name]
        with torch.no_grad():  # every variant trains from the same start
            for param, value in zip(groups["tqe"] + groups["delta"], start_values):
                param.copy_(value)
        torch.cuda.empty_cache()
        try:
            res = time_variant(model, qcfg, batches, args.warmup, precomputed, overrides)
            res["hours"] = plan_hours(res, precomputed, ptq_init_s, teacher_s, rows * world_size)
            flops = distill_flops(rows=rows, text_tokens=40, checkpointed=res["checkpointed_blocks"])
            res["tflops"] = flops["total"] / res["s_per_iter"] / 1e12
        except Exception as err:  # noqa: BLE001 - one variant failing must not end the run
            res = {"error": _first_line(err)}
        finally:
            if overrides.get("compile"):
                torch._dynamo.reset()
        if world_size > 1:  # the largest peak over the ranks (every rank joins, failed or not)
            peak = torch.tensor([res.get("peak_gib", -1.0)], device="cuda")
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            if "peak_gib" in res:
                res["peak_gib"] = float(peak)
        results["variants"][name] = res
        if rank == 0:
            print(name, res, flush=True)

    if args.profile:
        precomputed, overrides, _ = VARIANTS[args.profile]
        measured = results["variants"].get(args.profile, {})
        if overrides.get("checkpoint_blocks") == "auto":  # no probe steps inside the profile: its measured count
            overrides = {**overrides, "checkpoint_blocks": measured.get("checkpointed_blocks", "all")}
        with torch.no_grad():
            for param, value in zip(groups["tqe"] + groups["delta"], start_values):
                param.copy_(value)
        try:
            by_category, top = profile_variant(model, qcfg, batches, precomputed, overrides)
            results["profile"] = {"variant": args.profile, "ms_per_iteration": by_category, "top_kernels_ms": top}
        except Exception as err:  # noqa: BLE001
            results["profile"] = {"variant": args.profile, "error": _first_line(err)}

    results.update(environment())
    results["max_peak_gib"] = max((r["peak_gib"] for r in results["variants"].values() if "peak_gib" in r), default=None)
    if rank == 0:
        print_and_save(results, args.out)
        print(f"\n### Distillation, STDiT-XL/2 16x512x512, {results['quant_config']}, batch {results['batch_size']} "
              f"({world_size} GPU(s) × {rows} rows), {args.text_lengths} text lengths — {results['device']}, "
              f"torch {results['torch']}, {results['date']}\n")
        print(markdown(results))
        if shared_gpu:
            print(f"\n(ranks shared {torch.cuda.device_count()} GPU(s) over gloo: a check of the DDP path, "
                  "the timings and peaks mean nothing)")
        peak = results["max_peak_gib"]
        print(f"\npeak memory (max over variants{' and ranks' if world_size > 1 else ''}): "
              + ("–" if peak is None else f"{peak:.1f} GiB"))
        for name, res in results["variants"].items():
            if res.get("plan"):
                print(f"{name}: {res['plan']}")
        prof = results.get("profile")
        if prof and "ms_per_iteration" in prof:
            total = sum(prof["ms_per_iteration"].values())
            print(f"\nGPU kernel time per iteration, variant {prof['variant']} (torch.profiler; "
                  f"{total:.0f} ms in kernels)\n\n| kernels | ms / iteration | share |\n|---|---|---|")
            for category, ms in prof["ms_per_iteration"].items():
                print(f"| {category} | {ms:.0f} | {ms / total:.0%} |")
            print("\nlongest kernels (ms / iteration):")
            for name, ms in list(prof["top_kernels_ms"].items())[:12]:
                print(f"  {ms:7.1f}  {name}")
        elif prof:
            print(f"profile {prof['variant']}: {prof['error']}")
    destroy_process_group_if_needed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
