"""Real low-bit inference on one STDiT-XL/2 step at 16x512x512 (CFG batch 2), side by side in one process:
our bf16 model, the W8A8 and W4A8 integer models (IntLinear: Triton int8 GEMMs, qdiff.lowbit), and the bare bf16
block stack of the anchor script (`anchor_block_stack.py`) at the same shapes, each eager and, with --compile,
compiled with torch.compile (`t2v.models.stdit.compile_blocks`: every block one graph, the elementwise and layout work
and the integer models' per-token activation quantization fused by inductor around the GEMMs and attention; the anchor
compiled as its own script compiles it). Random weights.

Variants (rows of the step table; every one in its own try/except, an error is printed and the run goes on):
  bf16                              our bf16 model, eager
  bf16 compiled                     compile_blocks: temporal attention as matmul-softmax-matmul (the default)
  w8a8_int / w4a8_int               integer models, eager (fused producers off: the default)
  w8a8_int compiled / w4a8_int ...  compile_blocks: int GEMM as a custom op, activation quantization in plain torch
  anchor, anchor compiled           the bare bf16 block stack, ×28
 with --extra, ablations: bf16 compiled with SDPA temporal attention; integer models with the fused producers
 (`set_fusion`, eager) and compiled with the Triton act-quant kernel as an opaque op instead of inductor's fusion.
 with --temporal_kernel, the temporal attention as the Triton kernel of `qdiff.kernels.short_attention`
 (`set_temporal_attention` / compile_blocks(temporal_attention="short_triton")): "bf16, Triton temporal attention"
 (eager) and, with --compile, "bf16 compiled, Triton temporal attention" and "w8a8_int compiled, fused Triton act
 quant, Triton temporal attention" (each also as a CUDA graph with --cuda_graph).

Reported (markdown + JSON in --out):
  step        ms per step (median of CUDA-event timings after warm-up), peak GiB, DiT weight bytes; compile seconds
  per GEMM    each distinct linear shape: our int kernels (W8A8, W4A8, and with their activation quantization)
              in TOPS vs torch bf16 matmul and torch._int_mm at the same shape, measured in this run; the
              quantization alone, and fused with its producer vs the eager producer followed by it
  breakdown   torch.profiler device time of one step: GEMMs / attention / activation quantization (compiled: the
              inductor kernels that quantize, with the producer fused into them) / the rest; top kernels per class
              in the JSON and on the console
  numerics    relative L2 of the integer model vs the fake-quant model it came from (whole model, float32 without
              TF32, W8A8 and W4A8), of the bf16 integer model vs the float32 fake-quant model, and compiled vs eager

    python bench/bench_int_step.py --out logs/bench/int_step                      # eager only, < 8 min on an H100
    python bench/bench_int_step.py --compile --out logs/bench/int_step_compiled   # + compiled variants
    python bench/bench_int_step.py --compile --only anchor,bf16 --out D           # a subset (the 10-min limit of a
    python bench/bench_int_step.py --compile --only w8a8 --merge --out D          #  device call): --merge adds rows
    python bench/bench_int_step.py --check --out logs/bench/int_check             # = bench/check_int_kernels.py
    python bench/bench_int_step.py --compile --cuda_graph --temporal_kernel --only bf16 --out D   # + Triton temporal
Needs a CUDA GPU and triton. The anchor defaults to ../shared/bench/anchor_block_stack.py, or its copy in
.devcarry/ where ../shared is absent; only its definitions run (the part before its `res = {}` line). Every run
times our bf16 eager step and the eager anchor (seconds), so ratios always compare rows measured in one process.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import (  # noqa: E402
    StepLog, build_model, cuda_time, default_anchor, environment, inputs, release,
)

TOKENS = 2 * 16 * 1024  # CFG batch 2 · 16 frames · 1024 patches
TEXT_TOKENS = 2 * 40  # packed valid text tokens of the two samples (inputs(): 40 valid of 120)
HIDDEN, MLP = 1152, 4608
# (label, M, K, N, count per block) of every distinct linear shape of an STDiT-XL/2 block
GEMM_SHAPES = (
    ("q/k/v/proj, spatial+temporal+cross q/proj", TOKENS, HIDDEN, HIDDEN, 10),
    ("mlp.fc1", TOKENS, HIDDEN, MLP, 1),
    ("mlp.fc2", TOKENS, MLP, HIDDEN, 1),
    ("cross_attn.kv_linear (packed text)", TEXT_TOKENS, HIDDEN, 2 * HIDDEN, 1),
)
DEPTH = 28
ANCHOR_CUT = "res = {}"


# ------------------------------------------------------------------------------------------------ helpers
def _gib(nbytes: float) -> float:
    return nbytes / 2**30


def _device_time_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def classify_kernel(name: str) -> str:
    """'gemm', 'attention', 'act_quant' or 'other' for a CUDA kernel name of the profiler.

    Inductor names its kernels after the (original aten) ops they fuse (`triton_red_fused__to_copy_add_amax_amin_...`,
    at most 10 names): a fused kernel with a row min/max (softmax shows as `_softmax`) is an activation quantization,
    with its producer fused in.
    """
    low = name.lower()
    if "act_quant" in low:
        return "act_quant"
    if "fused" in low and ("amax" in low or "amin" in low) and "softmax" not in low:
        return "act_quant"
    if any(key in low for key in ("flash", "fmha", "sdpa", "attention", "softmax")):
        return "attention"
    if any(key in low for key in ("gemm", "xmma", "nvjet", "cutlass", "int_mm", "matmul", "sm90_", "wgmma", "gemv",
                                  "triton_tem_", "bmm")):  # triton_tem_: inductor's GEMM templates (max-autotune)
        return "gemm"
    return "other"


def step_breakdown(fn) -> dict:
    """Device milliseconds of one call of fn() per kernel class, and the top kernels of each class."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {"gemm": 0.0, "attention": 0.0, "act_quant": 0.0, "other": 0.0}
    top: dict[str, list] = {key: [] for key in totals}
    for event in prof.key_averages():
        micros = _device_time_us(event)
        if micros <= 0:
            continue
        kind = classify_kernel(event.key)
        totals[kind] += micros / 1e3
        top[kind].append((micros / 1e3, event.key[:90], event.count))
    result = {f"{key}_ms": value for key, value in totals.items()}
    result["total_ms"] = sum(totals.values())
    result["top"] = {key: [list(item) for item in sorted(items, reverse=True)[:10]] for key, items in top.items()}
    return result


def print_breakdown(label: str, row: dict) -> None:
    """The class totals and the top kernels of each class, on the console."""
    print(f"  where {label}'s time goes: GEMMs {row['gemm_ms']:.1f}, attention {row['attention_ms']:.1f}, act quant "
          f"{row['act_quant_ms']:.1f}, other {row['other_ms']:.1f} = {row['total_ms']:.1f} ms", flush=True)
    for kind, items in row["top"].items():
        for ms, name, count in items:
            print(f"    {kind:9s} {ms:7.2f} ms  x{count:<5d} {name}", flush=True)


def record_breakdown(results: dict, run_errors: list[str], label: str, step) -> None:
    """results["breakdown"][label]: the step_breakdown of step(), printed; a profiler error goes to run_errors."""
    try:
        results["breakdown"][label] = step_breakdown(step)
        print_breakdown(label, results["breakdown"][label])
    except Exception as exc:  # noqa: BLE001
        run_errors.append(f"{label} profile: {exc!r}"[:600])


def load_anchor(path: Path) -> dict:
    """Run the anchor script's definitions (everything before its `res = {}` line) and return its namespace."""
    if not path.is_file():
        raise FileNotFoundError(f"anchor script not found: {path} (copy ../shared/bench/anchor_block_stack.py there "
                                "or pass --anchor)")
    source = path.read_text()
    if ANCHOR_CUT not in source:
        raise ValueError(f"{path}: no '{ANCHOR_CUT}' line; cannot separate its definitions from its benchmark")
    # a registered module, not a bare dict: torch.compile looks the functions' globals up in sys.modules
    module = types.ModuleType("anchor_block_stack")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(source[: source.index(ANCHOR_CUT)], str(path), "exec"), module.__dict__)  # noqa: S102 - our own file
    return module.__dict__


def anchor_block_ms(namespace: dict, compiled: bool = False) -> float:
    """The anchor's own timing (its `bench`: median of 20 after 5 warm-ups) of its bf16 block, no grad; compiled as
    the anchor script compiles it (`torch.compile` of the block function with its defaults)."""
    block, lin, x, y = namespace["block"], namespace["lin_bf16"], namespace["x"], namespace["y"]
    with torch.no_grad():
        if not compiled:
            return namespace["bench"](lambda: block(x, y, lin))
        fn = torch.compile(lambda x, y: block(x, y, lin))
        return namespace["bench"](lambda: fn(x, y))


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ------------------------------------------------------------------------------------------------ models
def quantized_model(base: torch.nn.Module, qconfig, x, t, y, mask):
    """A deep copy of the float32 `base`, quantized with `qconfig` as calibration leaves it: balancing statistics from
    one forward, weight ranges initialised, small non-zero TQE terms (as after distillation), quantization on."""
    from qdiff.api import calibrate_balancing, init_weight_quantizers, quantize_model, set_quant_state

    model = copy.deepcopy(base)
    quantize_model(model, qconfig, adapter="stdit")
    with torch.no_grad():
        calibrate_balancing(model, qconfig, lambda: model(x, t, y, mask=mask))
        init_weight_quantizers(model)
        gen = torch.Generator(device="cuda").manual_seed(3)
        for module in model.modules():
            if getattr(module, "lora_b", None) is not None:
                module.lora_b.normal_(0, 1e-4, generator=gen)
                module.lora_b_out.normal_(0, 1e-4, generator=gen)
            if getattr(module, "frame_scale", None) is not None:
                module.frame_scale.normal_(0, 0.1, generator=gen)
    set_quant_state(model, weight=True, act=True)
    return model


def time_step(model, x, t, y, mask, iters, warmup) -> dict:
    """Median ms of one step, peak GiB, and the seconds of the first call (compilation, autotuning)."""
    def step():
        with torch.no_grad():
            return model(x, t, y, mask=mask)

    torch.cuda.synchronize()
    started = time.time()
    step()
    torch.cuda.synchronize()
    first_s = time.time() - started
    torch.cuda.reset_peak_memory_stats()  # after compilation and autotuning: the steady state's peak
    ms = cuda_time(step, iters, warmup)
    return {"ms": ms, "peak_gib": _gib(torch.cuda.max_memory_allocated()), "step": step, "first_call_s": first_s}


def dit_weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ------------------------------------------------------------------------------------------------ GEMM table
def gemm_table(iters: int, warmup: int) -> list[dict]:
    """Per distinct linear shape: bf16 matmul, torch._int_mm, our W8/W4 GEMMs (int32 codes in, bf16 out, zero
    points and bias in the epilogue), and our activation quantization (bf16 in), all measured here."""
    from qdiff.kernels.act_quant import quantize_per_token_triton
    from qdiff.kernels.fused_producers import GeluTanh, LayerNormModulate
    from qdiff.kernels.int_gemm import int_gemm_triton
    from qdiff.lowbit.pack import pack_int4

    rows_out = []
    for label, rows, depth, n_out, count in GEMM_SHAPES:
        flops = 2 * rows * depth * n_out
        a_bf16 = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16)
        w_bf16 = torch.randn(n_out, depth, device="cuda", dtype=torch.bfloat16) * 0.02
        act = quantize_per_token_triton(a_bf16, 8)
        w8 = torch.randint(-128, 128, (n_out, depth), device="cuda", dtype=torch.int8)
        w4 = torch.randint(-8, 8, (n_out, depth), device="cuda", dtype=torch.int8)
        packed = pack_int4(w4)
        common = dict(a_scale=act.scale, a_zero=act.zero, a_rowsum=act.rowsum,
                      w_scale=torch.rand(n_out, device="cuda") * 1e-3, bias=torch.randn(n_out, device="cuda"),
                      out_dtype=torch.bfloat16)
        w8_zero = torch.randint(-128, 128, (n_out,), device="cuda", dtype=torch.int32)
        w4_zero = torch.randint(-8, 8, (n_out,), device="cuda", dtype=torch.int32)
        row = {"shape": label, "M": rows, "K": depth, "N": n_out, "per_block": count}
        row["bf16_ms"] = cuda_time(lambda: a_bf16 @ w_bf16.t(), iters, warmup)
        if rows > 16:
            row["int_mm_ms"] = cuda_time(lambda: torch._int_mm(act.codes, w8.t()), iters, warmup)
        w8_colsum, w4_colsum = w8.sum(1, dtype=torch.int32), w4.sum(1, dtype=torch.int32)
        row["w8_gemm_ms"] = cuda_time(lambda: int_gemm_triton(act.codes, w=w8, w_zero=w8_zero, w_colsum=w8_colsum,
                                                              **common), iters, warmup)
        row["w4_gemm_ms"] = cuda_time(lambda: int_gemm_triton(act.codes, w=packed, w_zero=w4_zero, w_colsum=w4_colsum,
                                                              k=depth, **common), iters, warmup)
        row["act_quant_ms"] = cuda_time(lambda: quantize_per_token_triton(a_bf16, 8), iters, warmup)
        if rows == TOKENS:  # the producer of this input: LayerNorm + modulate (K = C) or GELU (fc2, K = 4C)
            shift, scale = (torch.randn(2, depth, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            producer = LayerNormModulate(shift, scale, rows // 2) if depth == HIDDEN else GeluTanh()
            row["fused_producer_ms"] = cuda_time(lambda: quantize_per_token_triton(a_bf16, 8, producer=producer),
                                                 iters, warmup)
            row["eager_producer_ms"] = cuda_time(lambda: quantize_per_token_triton(producer.apply(a_bf16), 8),
                                                 iters, warmup)
        for key in ("bf16", "int_mm", "w8_gemm", "w4_gemm"):
            if f"{key}_ms" in row:
                row[f"{key}_tops"] = flops / row[f"{key}_ms"] / 1e9
        row["w8_with_quant_tops"] = flops / (row["w8_gemm_ms"] + row["act_quant_ms"]) / 1e9
        row["w4_with_quant_tops"] = flops / (row["w4_gemm_ms"] + row["act_quant_ms"]) / 1e9
        act_bytes = 2 * rows * depth + rows * depth + 16 * rows
        row["act_quant_gbps"] = act_bytes / row["act_quant_ms"] / 1e6
        rows_out.append(row)
        print(f"GEMM {label}: bf16 {row['bf16_tops']:.0f} TFLOP/s, int_mm {row.get('int_mm_tops', float('nan')):.0f}, "
              f"ours W8 {row['w8_gemm_tops']:.0f}, W4 {row['w4_gemm_tops']:.0f} TOPS, act quant "
              f"{row['act_quant_ms']:.3f} ms", flush=True)
    return rows_out


# ------------------------------------------------------------------------------------------------ --check
def kernel_check() -> dict:
    """Every kernel variant vs its reference (`bench/check_int_kernels.py`), printed as it finishes."""
    from bench.check_int_kernels import run_all

    cases = []
    for name, status, detail, seconds in run_all():
        print(f"{status} {name} ({seconds:.1f} s): {detail}", flush=True)
        cases.append({"variant": name, "status": status, "detail": detail, "seconds": seconds})
    return {"cases": cases, "failed": [case["variant"] for case in cases if case["status"] == "FAIL"]}


# ------------------------------------------------------------------------------------------------ report
ANCHOR = "anchor: bare bf16 block stack ×28"
ANCHOR_COMPILED = "anchor compiled"


def _ratio(base, value) -> str:
    return f"{base / value:.2f}" if base and value else "–"


def markdown(results: dict) -> str:
    lines = [f"# Integer STDiT-XL/2 step (16x512x512, CFG batch 2) — {results['device']}, torch {results['torch']}, "
             f"triton {results['triton']}, {results['date']}", ""]
    lines += ["| variant | ms / step | × bare bf16 stack (speed-up) | × our bf16 (speed-up) | × our bf16 compiled | "
              "peak GiB | DiT weight MB | × bf16 bytes | first call s |",
              "|---|---|---|---|---|---|---|---|---|"]
    steps = results["steps"]
    bf16 = steps.get("bf16", {})
    compiled_ms = steps.get("bf16 compiled", {}).get("ms")
    for name, row in steps.items():
        if "ms" not in row:
            lines.append(f"| {name} | error: {row.get('error', '?')} | | | | | | | |")
            continue
        # baselines measured in the same process as the row (--merge joins runs)
        anchor_ms = row.get("anchor_ms") or results.get("anchor", {}).get("step_ms")
        bf16_ms = row.get("bf16_ms") or bf16.get("ms")
        weights = row.get("weight_bytes")
        mb = f"{weights / 1e6:.0f}" if weights else "–"
        ratio = f"{weights / bf16['weight_bytes']:.3f}" if weights and "weight_bytes" in bf16 else "–"
        peak = f"{row['peak_gib']:.2f}" if "peak_gib" in row else "–"
        first = f"{row['first_call_s']:.0f}" if "first_call_s" in row else "–"
        lines.append(f"| {name} | {row['ms']:.1f} | {_ratio(anchor_ms, row['ms'])} | {_ratio(bf16_ms, row['ms'])} | "
                     f"{_ratio(compiled_ms, row['ms'])} | {peak} | {mb} | {ratio} | {first} |")
    lines += ["", "Ratios to the bare stack and to our bf16 use the eager baselines timed in the same process as the "
              "row; \"× our bf16 compiled\" uses the `bf16 compiled` row (another process's when runs were merged). "
              "First call: seconds of the first step (compilation, autotuning)."]
    lines += ["", "## Per GEMM (TOPS = 2·M·K·N / time; ours: int8 codes in, bf16 out, zero points + bias fused)", "",
              "| shape | M×K×N | ×/block | bf16 matmul | torch._int_mm | ours W8A8 | ours W4A8 | act quant ms (GB/s) | "
              "W8A8 incl. quant | W4A8 incl. quant | producer + quant ms: fused / eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results.get("gemms", []):
        int_mm = f"{row['int_mm_tops']:.0f}" if "int_mm_tops" in row else "–"
        lines.append(f"| {row['shape']} | {row['M']}×{row['K']}×{row['N']} | {row['per_block']} | {row['bf16_tops']:.0f} | "
                     f"{int_mm} | {row['w8_gemm_tops']:.0f} | {row['w4_gemm_tops']:.0f} | {row['act_quant_ms']:.3f} "
                     f"({row['act_quant_gbps']:.0f}) | {row['w8_with_quant_tops']:.0f} | {row['w4_with_quant_tops']:.0f} | "
                     + (f"{row['fused_producer_ms']:.3f} / {row['eager_producer_ms']:.3f} |" if "fused_producer_ms" in row
                        else "– |"))
    lines += ["", "## Where one step's device time goes (torch.profiler, ms)", "",
              "Compiled rows: \"activation quant\" counts inductor's kernels that quantize, with the LayerNorm + "
              "modulate, GELU or layout copy that produces the activation fused in; the temporal attention's "
              "matmuls (matmul-softmax-matmul) count as GEMMs, its softmax as attention.", "",
              "| variant | GEMMs | attention | activation quant | everything else | total |", "|---|---|---|---|---|---|"]
    for name, row in results.get("breakdown", {}).items():
        if "gemm_ms" in row:
            lines.append(f"| {name} | {row['gemm_ms']:.1f} | {row['attention_ms']:.1f} | {row['act_quant_ms']:.1f} | "
                         f"{row['other_ms']:.1f} | {row['total_ms']:.1f} |")
    lines += ["", "## Numerics (relative L2 of the model output)", "",
              "| config | int fp32 vs fake-quant fp32 | int bf16 vs fake-quant fp32 | fused producers vs off (bf16) | "
              "compiled vs eager (bf16) | compiled vs fake-quant fp32 | fake-quant vs FP fp32 |",
              "|---|---|---|---|---|---|---|"]

    def cell(row, key):
        return f"{row[key]:.2e}" if key in row else "–"

    for name, row in results.get("numerics", {}).items():
        lines.append(f"| {name} | {cell(row, 'int_fp32_vs_fake_fp32')} | {cell(row, 'int_bf16_vs_fake_fp32')} | "
                     f"{cell(row, 'fused_vs_unfused_bf16')} | {cell(row, 'compiled_vs_eager_bf16')} | "
                     f"{cell(row, 'compiled_vs_fake_fp32')} | {cell(row, 'fake_vs_fp')} |")
    for name, row in results.get("numerics", {}).items():
        for key, value in row.items():
            if key not in NUMERICS_COLUMNS and isinstance(value, float):
                lines.append(f"- {name}: {key}: {value:.2e}")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {err}" for err in results["errors"]]
    return "\n".join(lines) + "\n"


NUMERICS_COLUMNS = ("int_fp32_vs_fake_fp32", "int_bf16_vs_fake_fp32", "fused_vs_unfused_bf16", "compiled_vs_eager_bf16",
                    "compiled_vs_fake_fp32", "fake_vs_fp", "prepare_s")


# ------------------------------------------------------------------------------------------------ main
GROUPS = ("anchor", "bf16", "w8a8", "w4a8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (int_step.md + int_step.json, or int_check.json)")
    p.add_argument("--check", action="store_true", help="only the kernel-correctness self-test on ragged shapes")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd variants (compile_blocks)")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode of our compiled variants (default: torch's default; e.g. "
                        "max-autotune-no-cudagraphs)")
    p.add_argument("--extra", action="store_true", help="ablations: fused producers (eager), SDPA temporal attention "
                                                        "and the Triton act-quant kernel (compiled)")
    p.add_argument("--temporal_kernel", action="store_true",
                   help="also time the temporal attention as the Triton short-attention kernel (bf16 eager; with "
                        "--compile bf16 compiled and the W8A8 model compiled with the fused Triton act quant)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)} "
                                                            "(our bf16 eager step and the eager anchor always run)")
    p.add_argument("--merge", action="store_true", help="add this run's rows to the int_step.json already in --out")
    p.add_argument("--anchor", default=default_anchor(), help="anchor_block_stack.py")
    p.add_argument("--w8a8", default=str(REPO / "configs/quant/w8a8_qvdit.yaml"), help="W8A8 quant config")
    p.add_argument("--w4a8", default=str(REPO / "configs/quant/w4a8_qvdit.yaml"), help="W4A8 quant config")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--no_gemm_table", action="store_true", help="skip the per-GEMM table")
    p.add_argument("--cuda_graph", action="store_true",
                   help="also time every compiled variant replayed as one CUDA graph per step (qdiff.cuda_graphs), "
                        "as the row '<variant>, CUDA graph'")
    args = p.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if only - set(GROUPS):
        p.error(f"--only: unknown {sorted(only - set(GROUPS))}; choose from {list(GROUPS)}")
    if not torch.cuda.is_available():
        print("bench_int_step needs a CUDA GPU", file=sys.stderr)
        return 2
    if importlib.util.find_spec("triton") is None:
        print("bench_int_step needs triton (pip install triton)", file=sys.stderr)
        return 2

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.check:
        report = kernel_check()
        (out_dir / "int_check.json").write_text(json.dumps(report, indent=1))
        print(f"{len(report['cases'])} variants, failed: {report['failed'] or 'none'}")
        return 1 if report["failed"] else 0

    from qdiff.api import compile_model
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int, set_fusion
    from t2v.models.stdit import set_temporal_attention

    results: dict = {**environment(), "steps": {}, "breakdown": {}, "numerics": {}, "errors": []}
    previous = out_dir / "int_step.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for key in ("steps", "breakdown", "numerics"):
            results[key].update(old.get(key, {}))
        results["errors"] = old.get("errors", [])
        if "gemms" in old:
            results["gemms"] = old["gemms"]
    log = StepLog(results, out_dir, "int_step", markdown)  # int_step.json + int_step.md
    save, fail, run_errors = log.save, log.fail, log.run_errors

    # 1. the bare bf16 block stack (anchor), first: nothing else on the GPU yet
    anchor_ms = None
    try:
        namespace = load_anchor(Path(args.anchor))
        block_ms = anchor_block_ms(namespace)
        anchor_ms = block_ms * DEPTH
        results["anchor"] = {"block_ms": block_ms, "step_ms": anchor_ms, "path": args.anchor}
        results["steps"][ANCHOR] = {"ms": anchor_ms, "anchor_ms": anchor_ms}
        print(f"anchor bare bf16 block: {block_ms:.2f} ms ({anchor_ms:.1f} ms / step)", flush=True)
        if args.compile and "anchor" in only:
            try:
                started_compile = time.time()
                compiled_block_ms = anchor_block_ms(namespace, compiled=True)
                results["steps"][ANCHOR_COMPILED] = {"ms": compiled_block_ms * DEPTH, "anchor_ms": anchor_ms,
                                                     "first_call_s": time.time() - started_compile}
                print(f"anchor compiled: {compiled_block_ms:.2f} ms ({compiled_block_ms * DEPTH:.1f} ms / step)",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on with the rest
                fail(ANCHOR_COMPILED, exc)
        namespace.clear()
    except Exception as exc:  # noqa: BLE001 - report and go on with the rest
        fail(ANCHOR, exc)
    release()

    # 2. the float32 master model and inputs; our bf16 step, eager (always: the baseline of every ratio) and compiled
    torch.backends.cuda.matmul.allow_tf32 = False  # numerics below compare float32 models exactly
    base = build_model(torch.float32)
    x32, t, y32, mask = inputs(torch.float32)
    x16, y16 = x32.bfloat16(), y32.bfloat16()
    with torch.no_grad():
        fp_out = base(x32, t, y32, mask=mask)
    base.cpu()  # peak memory of a step counts only the model that runs
    bf16_ms = None

    def record(label: str, model, timing: dict, profile: bool) -> None:
        results["steps"][label] = {"ms": timing["ms"], "peak_gib": timing["peak_gib"],
                                   "weight_bytes": dit_weight_bytes(model), "first_call_s": timing["first_call_s"],
                                   "bf16_ms": bf16_ms, "anchor_ms": anchor_ms}
        print(f"{label}: {timing['ms']:.1f} ms (first call {timing['first_call_s']:.0f} s)", flush=True)
        if profile and not args.no_profile:
            record_breakdown(results, run_errors, label, timing["step"])

    def record_graphed(label: str, model, reference: torch.Tensor, numerics: dict) -> None:
        """With --cuda_graph: the compiled `model` once more, its step captured as a CUDA graph and replayed."""
        if not args.cuda_graph:
            return
        from qdiff.cuda_graphs import CUDAGraphForward

        graphed_label, graphed = f"{label}, CUDA graph", CUDAGraphForward(model)
        try:
            timing = time_step(graphed, x16, t, y16, mask, args.iters, args.warmup)
            record(graphed_label, model, timing, True)
            with torch.no_grad():
                numerics[f"{graphed_label} vs {label} (bf16)"] = relative_l2(timing["step"](), reference)
            del timing
        except Exception as exc:  # noqa: BLE001
            fail(graphed_label, exc)
        graphed.reset()
        release()

    try:
        model = copy.deepcopy(base).cuda().to(torch.bfloat16)
        timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
        bf16_ms = timing["ms"]
        record("bf16", model, timing, "bf16" in only)
        with torch.no_grad():
            eager_out = timing["step"]()
        del timing
        if args.temporal_kernel and "bf16" in only:
            label = "bf16, Triton temporal attention"
            try:
                set_temporal_attention(model, "short_triton")
                timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
                record(label, model, timing, True)
                with torch.no_grad():
                    key = f"{label} vs eager (bf16)"
                    results["numerics"].setdefault("bf16", {})[key] = relative_l2(timing["step"](), eager_out)
                print(f"{label}: rel L2 vs eager {results['numerics']['bf16'][key]:.2e}", flush=True)
                del timing
            except Exception as exc:  # noqa: BLE001
                fail(label, exc)
            set_temporal_attention(model, "sdpa")
            release()
        if args.compile and "bf16" in only:
            variants = [("bf16 compiled", "math")] + ([("bf16 compiled (SDPA temporal)", "sdpa")] if args.extra else [])
            if args.temporal_kernel:
                variants.append(("bf16 compiled, Triton temporal attention", "short_triton"))
            for label, attention in variants:
                try:
                    compile_model(model, mode=args.compile_mode, temporal_attention=attention)
                    timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
                    record(label, model, timing, True)
                    with torch.no_grad():
                        key = "compiled_vs_eager_bf16" if attention == "math" else f"{label} vs eager (bf16)"
                        results["numerics"].setdefault("bf16", {})[key] = relative_l2(timing["step"](), eager_out)
                    print(f"{label}: rel L2 vs eager {results['numerics']['bf16'][key]:.2e}", flush=True)
                    with torch.no_grad():
                        record_graphed(label, model, timing["step"](), results["numerics"]["bf16"])
                    del timing
                except Exception as exc:  # noqa: BLE001
                    fail(label, exc)
                compile_model(model, enabled=False)
                release()
        del model, eager_out
    except Exception as exc:  # noqa: BLE001
        fail("bf16", exc)
    release()
    save()

    # 3. W8A8 and W4A8 integer models: numerics vs their fake-quant models, then the bf16 integer steps
    for name, yaml_path in (("w8a8_int", args.w8a8), ("w4a8_int", args.w4a8)):
        if name.split("_")[0] not in only:
            continue
        qmodel = fake = None
        try:
            base.cuda()
            qconfig = apply_overrides(QuantConfig.from_yaml(yaml_path), ["distill.enabled=false"])
            t0 = time.time()
            qmodel = quantized_model(base, qconfig, x32, t, y32, mask)
            with torch.no_grad():
                fake = qmodel(x32, t, y32, mask=mask)
                convert_to_int(qmodel)
                int_out = qmodel(x32, t, y32, mask=mask)
            numerics = {"config": yaml_path, "int_fp32_vs_fake_fp32": relative_l2(int_out, fake),
                        "fake_vs_fp": relative_l2(fake, fp_out), "prepare_s": time.time() - t0}
            results["numerics"][name] = numerics
            del int_out
            qmodel.to(torch.bfloat16)  # IntLinear keeps its float32 scales; the rest of the model goes bf16
            base.cpu()
            release()
        except Exception as exc:  # noqa: BLE001
            fail(name, exc)
            base.cpu()
            qmodel = None
            release()
            save()
            continue
        # (label, fusion on, compiled, compiled act quant, compiled temporal attention)
        variants = [(name, False, False, None, None)]
        if args.extra:
            variants.append((f"{name} (fused producers)", True, False, None, None))
        if args.compile:
            variants.append((f"{name} compiled", False, True, "torch", "math"))
            variants.append((f"{name} compiled, fused Triton act quant", False, True, "fused", "math"))
            if args.extra:
                variants.append((f"{name} compiled (act-quant kernel)", False, True, "kernel", "math"))
            if args.temporal_kernel and name == "w8a8_int":  # the fastest W8A8 variant, with the kernel
                variants.append((f"{name} compiled, fused Triton act quant, Triton temporal attention", False, True,
                                 "fused", "short_triton"))
        eager_half = None
        for label, fused, compiled, act_quant, attention in variants:
            try:
                set_fusion(qmodel, fused)
                if compiled:
                    compile_model(qmodel, mode=args.compile_mode, int_act_quant=act_quant,
                                  temporal_attention=attention)
                timing = time_step(qmodel, x16, t, y16, mask, args.iters, args.warmup)
                with torch.no_grad():
                    half_out = timing["step"]()
                if label == name:
                    eager_half = half_out
                    numerics["int_bf16_vs_fake_fp32"] = relative_l2(half_out, fake)
                elif eager_half is not None:  # (the eager variant failed: no comparison)
                    key = ("fused_vs_unfused_bf16" if fused else "compiled_vs_eager_bf16" if act_quant == "torch"
                           else f"{label} vs eager (bf16)")
                    numerics[key] = relative_l2(half_out, eager_half)
                if compiled and act_quant == "torch":
                    numerics["compiled_vs_fake_fp32"] = relative_l2(half_out, fake)
                record(label, qmodel, timing, True)
                if compiled:
                    record_graphed(label, qmodel, half_out, numerics)
                del timing, half_out
            except Exception as exc:  # noqa: BLE001
                fail(label, exc)
            if compiled:
                compile_model(qmodel, enabled=False)
            set_fusion(qmodel, False)
            release()
            save()
        print(f"{name}: " + ", ".join(f"{key} {value:.2e}" for key, value in numerics.items()
                                       if isinstance(value, float) and key != "prepare_s"), flush=True)
        del qmodel, fake, eager_half
        release()
        save()
    del base

    # 4. per-GEMM rates
    if not args.no_gemm_table:
        try:
            results["gemms"] = gemm_table(max(args.iters, 20), args.warmup)
        except Exception as exc:  # noqa: BLE001
            run_errors.append(f"gemm table: {exc!r}")
    return log.finish(started)


if __name__ == "__main__":
    sys.exit(main())
