"""Real low-bit inference on one STDiT-XL/2 step at 16x512x512 (CFG batch 2), side by side in one process:
our bf16 model, the W8A8 and W4A8 integer models (IntLinear: Triton int8 GEMMs, qdiff.lowbit) with fused producers
(LayerNorm + modulate and GELU quantize inside one kernel, opt-in with `set_fusion`) and with fusion off (the
default: eager LayerNorm, modulation and GELU, then a separate quantization pass per input), and the bare bf16
block stack of the anchor script (`anchor_block_stack.py`) at the same shapes. Random weights.

Reported (markdown + JSON in --out):
  step        ms per step (median of CUDA-event timings after warm-up), peak GiB, DiT weight bytes
  per GEMM    each distinct linear shape: our int kernels (W8A8, W4A8, and with their activation quantization)
              in TOPS vs torch bf16 matmul and torch._int_mm at the same shape, measured in this run; the
              quantization alone, and fused with its producer vs the eager producer followed by it
  breakdown   torch.profiler device time of one step: GEMMs / attention / activation quantization (fused
              producers included) / the rest
  numerics    relative L2 of the integer model vs the fake-quant model it came from (whole model, float32 without
              TF32, W8A8 and W4A8), of the bf16 integer model vs the float32 fake-quant model, and fused vs unfused

    python bench/bench_int_step.py --out logs/bench/int_step          # < 8 min on an H100, mostly Triton compile + autotune
    python bench/bench_int_step.py --check --out logs/bench/int_check  # = bench/check_int_kernels.py, saved as JSON
Needs a CUDA GPU and triton. The anchor defaults to .devcarry/anchor_block_stack.py (a copy of
../shared/bench/anchor_block_stack.py); only its definitions run (the part before its `res = {}` line).
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import build_model, cuda_time, environment, inputs  # noqa: E402

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
    """'gemm', 'attention', 'act_quant' or 'other' for a CUDA kernel name of the profiler."""
    low = name.lower()
    if "act_quant" in low:
        return "act_quant"
    if any(key in low for key in ("flash", "fmha", "sdpa", "attention", "softmax")):
        return "attention"
    if any(key in low for key in ("gemm", "xmma", "nvjet", "cutlass", "int_mm", "matmul", "sm90_", "wgmma", "gemv")):
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
    result["top"] = {key: [list(item) for item in sorted(items, reverse=True)[:4]] for key, items in top.items()}
    return result


def load_anchor(path: Path) -> dict:
    """Run the anchor script's definitions (everything before its `res = {}` line) and return its namespace."""
    if not path.is_file():
        raise FileNotFoundError(f"anchor script not found: {path} (copy ../shared/bench/anchor_block_stack.py there "
                                "or pass --anchor)")
    source = path.read_text()
    if ANCHOR_CUT not in source:
        raise ValueError(f"{path}: no '{ANCHOR_CUT}' line; cannot separate its definitions from its benchmark")
    namespace: dict = {"__name__": "anchor_block_stack"}
    exec(compile(source[: source.index(ANCHOR_CUT)], str(path), "exec"), namespace)  # noqa: S102 - our own file
    return namespace


def anchor_block_ms(namespace: dict) -> float:
    """The anchor's own timing (its `bench`: median of 20 after 5 warm-ups) of its bf16 block, no grad."""
    block, lin, x, y = namespace["block"], namespace["lin_bf16"], namespace["x"], namespace["y"]
    with torch.no_grad():
        return namespace["bench"](lambda: block(x, y, lin))


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
    def step():
        with torch.no_grad():
            return model(x, t, y, mask=mask)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time(step, iters, warmup)
    return {"ms": ms, "peak_gib": _gib(torch.cuda.max_memory_allocated()), "step": step}


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
def markdown(results: dict) -> str:
    lines = [f"# Integer STDiT-XL/2 step (16x512x512, CFG batch 2) — {results['device']}, torch {results['torch']}, "
             f"triton {results['triton']}, {results['date']}", ""]
    lines += ["| variant | ms / step | × bare bf16 stack (speed-up) | × our bf16 (speed-up) | peak GiB | DiT weight MB | × bf16 bytes |",
              "|---|---|---|---|---|---|---|"]
    steps = results["steps"]
    anchor_ms = results.get("anchor", {}).get("step_ms")
    bf16 = steps.get("bf16", {})
    for name, row in steps.items():
        if "ms" not in row:
            lines.append(f"| {name} | error: {row.get('error', '?')} | | | | | |")
            continue
        vs_anchor = f"{anchor_ms / row['ms']:.2f}" if anchor_ms else "–"
        vs_bf16 = f"{bf16['ms'] / row['ms']:.2f}" if "ms" in bf16 else "–"
        ratio = f"{row['weight_bytes'] / bf16['weight_bytes']:.3f}" if "weight_bytes" in bf16 else "–"
        lines.append(f"| {name} | {row['ms']:.1f} | {vs_anchor} | {vs_bf16} | {row['peak_gib']:.2f} | "
                     f"{row['weight_bytes'] / 1e6:.0f} | {ratio} |")
    if anchor_ms:
        lines.append(f"| bare bf16 block stack (anchor, ×{DEPTH}) | {anchor_ms:.1f} | 1.00 | "
                     f"{(bf16['ms'] / anchor_ms) if 'ms' in bf16 else float('nan'):.2f} | – | – | – |")
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
              "| variant | GEMMs | attention | activation quant | everything else | total |", "|---|---|---|---|---|---|"]
    for name, row in results.get("breakdown", {}).items():
        if "gemm_ms" in row:
            lines.append(f"| {name} | {row['gemm_ms']:.1f} | {row['attention_ms']:.1f} | {row['act_quant_ms']:.1f} | "
                         f"{row['other_ms']:.1f} | {row['total_ms']:.1f} |")
    lines += ["", "## Numerics (relative L2 of the model output)", "",
              "| config | int fp32 vs fake-quant fp32 | int bf16 vs fake-quant fp32 | fused vs fusion off (bf16) | "
              "fake-quant vs FP fp32 |", "|---|---|---|---|---|"]
    for name, row in results.get("numerics", {}).items():
        lines.append(f"| {name} | {row.get('int_fp32_vs_fake_fp32', float('nan')):.2e} | "
                     f"{row.get('int_bf16_vs_fake_fp32', float('nan')):.2e} | "
                     f"{row.get('fused_vs_unfused_bf16', float('nan')):.2e} | {row.get('fake_vs_fp', float('nan')):.2e} |")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {err}" for err in results["errors"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (int_step.md + int_step.json, or int_check.json)")
    p.add_argument("--check", action="store_true", help="only the kernel-correctness self-test on ragged shapes")
    p.add_argument("--anchor", default=str(REPO / ".devcarry/anchor_block_stack.py"), help="anchor_block_stack.py")
    p.add_argument("--w8a8", default=str(REPO / "configs/quant/w8a8_qvdit.yaml"), help="W8A8 quant config")
    p.add_argument("--w4a8", default=str(REPO / "configs/quant/w4a8_qvdit.yaml"), help="W4A8 quant config")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler breakdown")
    args = p.parse_args(argv)
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

    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int, set_fusion

    results: dict = {**environment(), "steps": {}, "breakdown": {}, "numerics": {}, "errors": []}

    def save() -> None:
        clean = json.loads(json.dumps(results, default=str))
        (out_dir / "int_step.json").write_text(json.dumps(clean, indent=1))
        (out_dir / "int_step.md").write_text(markdown(clean))

    # 1. the bare bf16 block stack (anchor), first: nothing else on the GPU yet
    try:
        namespace = load_anchor(Path(args.anchor))
        block_ms = anchor_block_ms(namespace)
        results["anchor"] = {"block_ms": block_ms, "step_ms": block_ms * DEPTH, "path": args.anchor}
        print(f"anchor bare bf16 block: {block_ms:.2f} ms ({block_ms * DEPTH:.1f} ms / step)", flush=True)
        namespace.clear()
    except Exception as exc:  # noqa: BLE001 - report and go on with the rest
        results["errors"].append(f"anchor: {exc!r}")
    gc.collect()
    torch.cuda.empty_cache()

    # 2. the float32 master model and inputs; our bf16 step
    torch.backends.cuda.matmul.allow_tf32 = False  # numerics below compare float32 models exactly
    base = build_model(torch.float32)
    x32, t, y32, mask = inputs(torch.float32)
    x16, y16 = x32.bfloat16(), y32.bfloat16()
    with torch.no_grad():
        fp_out = base(x32, t, y32, mask=mask)
    model = copy.deepcopy(base).to(torch.bfloat16)
    base.cpu()  # peak memory of a step counts only the model that runs
    timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
    results["steps"]["bf16"] = {"ms": timing["ms"], "peak_gib": timing["peak_gib"], "weight_bytes": dit_weight_bytes(model)}
    print(f"our bf16 step: {timing['ms']:.1f} ms", flush=True)
    if not args.no_profile:
        results["breakdown"]["bf16"] = step_breakdown(timing["step"])
    del model, timing
    base.cuda()
    save()

    # 3. W8A8 and W4A8 integer models: numerics vs their fake-quant models, then the bf16 integer step
    for name, yaml_path in (("w8a8_int", args.w8a8), ("w4a8_int", args.w4a8)):
        try:
            qconfig = apply_overrides(QuantConfig.from_yaml(yaml_path), ["distill.enabled=false"])
            t0 = time.time()
            qmodel = quantized_model(base, qconfig, x32, t, y32, mask)
            with torch.no_grad():
                fake = qmodel(x32, t, y32, mask=mask)
                convert_to_int(qmodel)
                int_out = qmodel(x32, t, y32, mask=mask)
            numerics = {"config": yaml_path, "int_fp32_vs_fake_fp32": relative_l2(int_out, fake),
                        "fake_vs_fp": relative_l2(fake, fp_out), "prepare_s": time.time() - t0}
            qmodel.to(torch.bfloat16)  # IntLinear keeps its float32 scales; the rest of the model goes bf16
            base.cpu()
            gc.collect()
            torch.cuda.empty_cache()
            for fused in (True, False):  # fused producers (the default), then the ablation
                set_fusion(qmodel, fused)
                label = name if fused else f"{name} (fusion off)"
                timing = time_step(qmodel, x16, t, y16, mask, args.iters, args.warmup)
                with torch.no_grad():
                    half_out = timing["step"]()
                if fused:
                    fused_out = half_out
                    numerics["int_bf16_vs_fake_fp32"] = relative_l2(half_out, fake)
                else:
                    numerics["fused_vs_unfused_bf16"] = relative_l2(fused_out, half_out)
                results["steps"][label] = {"ms": timing["ms"], "peak_gib": timing["peak_gib"],
                                           "weight_bytes": dit_weight_bytes(qmodel)}
                print(f"{label}: {timing['ms']:.1f} ms", flush=True)
                if not args.no_profile:
                    results["breakdown"][label] = step_breakdown(timing["step"])
                del timing, half_out
            results["numerics"][name] = numerics
            print(f"{name}: rel L2 vs fake quant {numerics['int_fp32_vs_fake_fp32']:.2e} (fp32), "
                  f"{numerics['int_bf16_vs_fake_fp32']:.2e} (bf16); fused vs unfused {numerics['fused_vs_unfused_bf16']:.2e}",
                  flush=True)
            del qmodel, fake, int_out, fused_out
        except Exception as exc:  # noqa: BLE001
            results["steps"][name] = {"error": repr(exc)[:300]}
            results["errors"].append(f"{name}: {exc!r}")
        base.cuda()
        gc.collect()
        torch.cuda.empty_cache()
        save()
    del base

    # 4. per-GEMM rates
    try:
        results["gemms"] = gemm_table(max(args.iters, 20), args.warmup)
    except Exception as exc:  # noqa: BLE001
        results["errors"].append(f"gemm table: {exc!r}")
    results["wall_s"] = time.time() - started
    save()
    print((out_dir / "int_step.md").read_text())
    return 0 if not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
