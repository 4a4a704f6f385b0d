"""The FP8 path on one STDiT-XL/2 step at 16x512x512 (CFG batch 2, random weights), side by side in one process:
our bf16 model and the FP8 models (FP8Linear, qdiff.lowbit.fp8_linear: per-token e4m3 activations, torch._scaled_mm
with row-wise scales), each compiled with torch.compile (`t2v.models.stdit.compile_blocks`: the absmax + cast of every
activation fused by inductor into the op that produces it) and optionally replayed as one CUDA graph per step
(qdiff.cuda_graphs.CUDAGraphForward).

Variants (rows of the step table; each in its own try/except, an error is printed and the run goes on):
  bf16 compiled                 our bf16 model
  w8a8_fp8 compiled             configs/quant/w8a8_fp8.yaml: e4m3 weights, per-token e4m3 activations, no balancing
  w4a8_fp8 compiled             configs/quant/w4a8_fp8.yaml: 4-bit integer codes (exact in e4m3, unpacked to e4m3 in
                                each forward) for the attention linears, e4m3 MLP weights, smoothing (x / s fused)
  <variant>, CUDA graph         with --cuda_graph
  <model>, fast compiled        with --fast, after the model's plain rows: q, k and v merged into one linear
                                (t2v.models.stdit.merge_qkv; layers that cannot merge stay), the Triton temporal
                                attention (compile_blocks(temporal_attention="short_triton")), the Triton
                                cross-attention (cross_attention="triton", since session 15) and the fused activation
                                quantization (compile_model(int_act_quant="fused"): the producer LayerNorm + modulate
                                or GELU inside the FP8 quantization kernel)
  <model>, fast, permuted temporal  with --fast --permuted_temporal: the fast rows with the temporal attention on
                                permuted [B*S, T, C] copies (Attention.frame_major off), the layout before session 12;
                                the fast rows themselves run it frame-major ([B, T, S, C] views, no copies)
  <model>, fast, residual adds apart  with --fast --unfused_residual: the fast rows without the residual step in
                                the quantization kernel (x + gate·y as its own op, as before session 12)
  <model>, fast, MLP residual apart  with --fast --mlp_residual_apart: the fast rows with each block's MLP residual
                                add in its own block (STDiT.defer_mlp_residual off: an op of its own, not in the next
                                block's norm1 quantization)
  <model>, fast, cross-attention writes e4m3  with --fast --cross_fp8_output: the Triton cross-attention quantizes
                                its output for an FP8 proj itself (MultiHeadCrossAttention.fp8_output)
  <model>, fast, exact tanh     with --fast --exact_tanh_rows: the fast rows with GELU computed as v / (1 + exp(−2u))
                                in the fused FP8 kernel instead of with the GPU's tanh.approx (before session 16)
  <model>, fast, eager ends     with --fast --eager_ends_rows: the fast rows with the position tables before the first
                                block and the head after the last (deferred add, final layer) eager, not compiled
                                (compile_blocks(compile_ends=False); before session 17)
  <model>, fast, SDPA cross-attention  with --fast --sdpa_cross: the fast rows with the cross-attention on SDPA
                                (cuDNN) and proj quantizing its own input, as before session 15
  <model>, fast, fast accumulation  with --fast --fast_accum_rows: the fast rows with torch._scaled_mm's
                                use_fast_accum (Hopper's FP8 accumulation without periodic promotion)
  anchor                        the bare bf16 block stack of --anchor (anchor_block_stack.py) ×depth, eager, timed first
                                (the × anchor column) and again after the models (its drift within the process)
  <variant> eager               with --eager
  w4a8_fp8 compiled, cached     with --cache_w4: the e4m3 copy of the integer codes kept in memory (no unpacking)
Reported (markdown + JSON in --out): ms per step (median of CUDA-event timings after warm-up), peak GiB, DiT weight
bytes (persistent tensors: what a file holds) and resident bytes (all buffers, caches included), first-call seconds;
numerics (relative L2 of the model output): the float32 FP8 model vs the float32 fake-quant model it came from (on a
GPU whose _scaled_mm has no float32 output this runs the reference GEMM: exact products, float32 sums), the bf16 FP8
model eager and compiled vs that fake-quant model, compiled vs eager, CUDA graph vs compiled, and fake-quant vs FP;
which output dtypes _scaled_mm accepts here; per GEMM shape of a block: bf16 matmul vs _scaled_mm (e4m3 in, bf16
out, row-wise scales and bias) in TFLOP/s, and the eager and compiled per-token e4m3 quantization of its input;
with the profiler (default), where one compiled step's device time goes (GEMMs / attention / act quant / other).

    python bench/bench_fp8_step.py --out logs/bench/fp8_step                     # compiled bf16, W8A8, W4A8 (H100)
    python bench/bench_fp8_step.py --cuda_graph --out logs/bench/fp8_step        # + CUDA-graph replay rows
    python bench/bench_fp8_step.py --cuda_graph --fast --out D                   # + the fast rows, one process
    python bench/bench_fp8_step.py --only w4a8 --cache_w4 --merge --out D        # a subset, added to D's JSON
    python bench/bench_fp8_step.py --depth 4 --iters 3 --out /tmp/fp8_quick      # a quick check on 4 blocks
Needs a CUDA GPU (FP8 tensor cores: sm_89 or newer for torch._scaled_mm). Builds the model and times steps with
bench/bench_int_step.py's and bench/common.py's functions, so the numbers compare with bench_int_step's rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import FAST_KERNELS as FAST, default_anchor  # noqa: E402

GROUPS = ("bf16", "w8a8", "w4a8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (fp8_step.md + fp8_step.json)")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    p.add_argument("--merge", action="store_true", help="add this run's rows to the fp8_step.json already in --out")
    p.add_argument("--w8a8", default=str(REPO / "configs/quant/w8a8_fp8.yaml"), help="W8A8 FP8 quant config")
    p.add_argument("--w4a8", default=str(REPO / "configs/quant/w4a8_fp8.yaml"), help="W4A8 FP8 quant config")
    p.add_argument("--eager", action="store_true", help="also time every model eagerly")
    p.add_argument("--cuda_graph", action="store_true", help="also time every compiled model replayed as a CUDA graph")
    p.add_argument("--fast", action="store_true",
                   help="also time each model with merged q/k/v, the Triton temporal attention and fused act quant")
    p.add_argument("--anchor", default=default_anchor(),
                   help="anchor_block_stack.py (a copy of ../shared/bench/anchor_block_stack.py); skipped if absent")
    p.add_argument("--cache_w4", action="store_true",
                   help="also time W4A8 with the e4m3 copy of its integer weight codes cached (FP8Linear.cache_weight)")
    p.add_argument("--permuted_temporal", action="store_true",
                   help="with --fast: also the fast rows with the temporal attention on permuted [B*S, T, C] copies "
                        "(Attention.frame_major off), the layout before session 12, side by side")
    p.add_argument("--unfused_residual", action="store_true",
                   help="with --fast: also the fast rows with the residual adds as separate ops (no residual step in "
                        "the quantization kernel, as before session 12), side by side")
    p.add_argument("--mlp_residual_apart", action="store_true",
                   help="with --fast: also the fast rows with each block's MLP residual add in its own block "
                        "(STDiT.defer_mlp_residual off), side by side")
    p.add_argument("--cross_fp8_output", action="store_true",
                   help="with --fast: also time the fast rows with the cross-attention writing proj's e4m3 codes")
    p.add_argument("--sdpa_cross", action="store_true",
                   help="with --fast: also time the fast rows with the cross-attention on SDPA (before session 15)")
    p.add_argument("--exact_tanh_rows", action="store_true",
                   help="with --fast: also the fast rows with GELU's exact tanh formula in the fused FP8 kernel "
                        "(qdiff.kernels.fused_producers.HARDWARE_TANH off), as before session 16")
    p.add_argument("--eager_ends_rows", action="store_true",
                   help="with --fast: also the fast rows with the work before the first block and after the last "
                        "left eager (compile_blocks(compile_ends=False)), as before session 17")
    p.add_argument("--cublaslt_workspace", choices=("default", "none"), default="default",
                   help="none: no cuBLASLt workspace for the whole process, the anchor included (qdiff.blas; "
                        "statically scheduled GEMMs without memsets); set before the first GEMM")
    p.add_argument("--fast_accum", action="store_true", help="torch._scaled_mm's use_fast_accum in every FP8 layer")
    p.add_argument("--fast_accum_rows", action="store_true",
                   help="with --fast: also the fast rows with torch._scaled_mm's use_fast_accum, side by side")
    p.add_argument("--fast_only", action="store_true",
                   help="with --fast: skip the plain compiled rows of each model (the fast rows and the anchor only)")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--depth", type=int, default=28, help="blocks kept (28 = the whole STDiT-XL/2)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--no_gemm_table", action="store_true", help="skip the per-GEMM table")
    args = p.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    if only - set(GROUPS):
        p.error(f"--only: unknown {sorted(only - set(GROUPS))}; choose from {list(GROUPS)}")
    args.only = only
    return args


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (non-persistent ones, such as e4m3 weight caches, included)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------------------------------------ GEMM table
def gemm_table(iters: int, warmup: int) -> list[dict]:
    """Per linear shape of a block (bench_int_step.GEMM_SHAPES): bf16 matmul, torch._scaled_mm (e4m3, bf16 out, row-wise
    scales, bias) and the per-token e4m3 quantization of a bf16 input, eager and compiled, measured here."""
    from bench.bench_int_step import GEMM_SHAPES
    from bench.common import cuda_time
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token

    quantize_compiled = torch.compile(quantize_fp8_per_token, dynamic=False)
    rows_out = []
    for label, rows, depth, n_out, count in GEMM_SHAPES:
        flops = 2 * rows * depth * n_out
        a = torch.randn(rows, depth, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n_out, depth, device="cuda", dtype=torch.bfloat16) * 0.02
        a8, a_scale = quantize_fp8_per_token(a)
        w8, w_scale = quantize_fp8_per_token(w)
        w_scale_row = w_scale.reshape(1, -1).contiguous()
        bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16)
        row = {"shape": label, "M": rows, "K": depth, "N": n_out, "per_block": count}
        row["bf16_ms"] = cuda_time(lambda: torch.nn.functional.linear(a, w, bias), iters, warmup)
        try:
            row["fp8_ms"] = cuda_time(lambda: torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale_row,
                                                               bias=bias, out_dtype=torch.bfloat16), iters, warmup)
            row["fp8_fast_accum_ms"] = cuda_time(
                lambda: torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale_row, bias=bias,
                                         out_dtype=torch.bfloat16, use_fast_accum=True), iters, warmup)
        except RuntimeError as exc:
            row["fp8_error"] = repr(exc)[:200]
        row["quant_eager_ms"] = cuda_time(lambda: quantize_fp8_per_token(a), iters, warmup)
        row["quant_compiled_ms"] = cuda_time(lambda: quantize_compiled(a), iters, warmup)
        for key in ("bf16", "fp8", "fp8_fast_accum"):
            if f"{key}_ms" in row:
                row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
        if "fp8_ms" in row:
            row["fp8_with_quant_tflops"] = flops / (row["fp8_ms"] + row["quant_compiled_ms"]) / 1e9
        rows_out.append(row)
        print(f"GEMM {label}: bf16 {row['bf16_tflops']:.0f} TFLOP/s, fp8 {row.get('fp8_tflops', float('nan')):.0f}, "
              f"quant {row['quant_eager_ms']:.3f} ms eager / {row['quant_compiled_ms']:.3f} compiled", flush=True)
    return rows_out


# ------------------------------------------------------------------------------------------------ report
def _ratio(base: float | None, value: float) -> str:
    return f"{base / value:.2f}" if base else "–"


def markdown(results: dict) -> str:
    lines = [f"# FP8 STDiT-XL/2 step (16x512x512, CFG batch 2, {results.get('depth', 28)} blocks) — "
             f"{results['device']}, torch {results['torch']}, {results['date']}", "",
             f"torch._scaled_mm accepts (row-wise scales, bias): {results.get('scaled_mm', {})}", "",
             f"cuBLASLt workspace: {results.get('cublaslt_workspace', 'torch default')}", "",
             "| variant | ms / step | × anchor (speed-up) | × bf16 compiled (speed-up) | peak GiB | "
             "DiT weight MB (persistent) | resident MB | × bf16 bytes | first call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    steps = results["steps"]
    base = steps.get("bf16 compiled", {})
    anchor_ms = results.get("anchor", {}).get("step_ms")
    for name, row in steps.items():
        if "ms" not in row:
            lines.append(f"| {name} | error: {row.get('error', '?')} | | | | | | | |")
            continue
        if "weight_bytes" not in row:  # the anchor (timed first, and again after the models): a time only
            lines.append(f"| {name} | {row['ms']:.1f} | {_ratio(anchor_ms, row['ms'])} | "
                         f"{_ratio(base.get('ms'), row['ms'])} | | | | | |")
            continue
        ratio = f"{row['weight_bytes'] / base['weight_bytes']:.3f}" if base.get("weight_bytes") else "–"
        lines.append(f"| {name} | {row['ms']:.1f} | {_ratio(anchor_ms, row['ms'])} | {_ratio(base.get('ms'), row['ms'])} "
                     f"| {row['peak_gib']:.2f} | {row['weight_bytes'] / 1e6:.0f} | {row['resident_bytes'] / 1e6:.0f} | "
                     f"{ratio} | {row['first_call_s']:.0f} |")
    lines += ["", "## Per GEMM (TFLOP/s = 2·M·K·N / time; FP8: e4m3 in, bf16 out, row-wise scales and bias)", "",
              "| shape | M×K×N | ×/block | bf16 | fp8 _scaled_mm | fp8, fast accumulation | fp8 incl. compiled quant "
              "| quant ms eager / compiled |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results.get("gemms", []):
        fp8 = f"{row['fp8_tflops']:.0f}" if "fp8_tflops" in row else row.get("fp8_error", "–")
        accum = f"{row['fp8_fast_accum_tflops']:.0f}" if "fp8_fast_accum_tflops" in row else "–"
        with_quant = f"{row['fp8_with_quant_tflops']:.0f}" if "fp8_with_quant_tflops" in row else "–"
        lines.append(f"| {row['shape']} | {row['M']}×{row['K']}×{row['N']} | {row['per_block']} | {row['bf16_tflops']:.0f} "
                     f"| {fp8} | {accum} | {with_quant} | {row['quant_eager_ms']:.3f} / {row['quant_compiled_ms']:.3f} |")
    if results.get("breakdown"):
        lines += ["", "## Where one step's device time goes (torch.profiler, ms)", "",
                  "| variant | GEMMs | attention | activation quant | everything else | total |", "|---|---|---|---|---|---|"]
        for name, row in results["breakdown"].items():
            lines.append(f"| {name} | {row['gemm_ms']:.1f} | {row['attention_ms']:.1f} | {row['act_quant_ms']:.1f} | "
                         f"{row['other_ms']:.1f} | {row['total_ms']:.1f} |")
    lines += ["", "## Numerics (relative L2 of the model output)", ""]
    for name, row in results.get("numerics", {}).items():
        for key, value in row.items():
            if isinstance(value, float):
                lines.append(f"- {name}: {key}: {value:.2e}")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {err}" for err in results["errors"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_step needs a CUDA GPU (FP8 tensor cores)", file=sys.stderr)
        return 2
    from bench.bench_int_step import (anchor_block_ms, dit_weight_bytes, load_anchor, quantized_model, record_breakdown,
                                      relative_l2, time_step)
    from bench.common import StepLog, build_model, environment, inputs, release
    from qdiff.api import compile_model
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.cuda_graphs import CUDAGraphForward
    from qdiff.lowbit import convert_to_int, fp8_layers, scaled_mm_supported
    from t2v.models.stdit import merge_qkv

    workspace = "torch's default"
    if args.cublaslt_workspace == "none":  # before any GEMM: torch < 2.13 reads it once
        from qdiff.blas import drop_cublaslt_workspace

        workspace = f"none (set at {drop_cublaslt_workspace()}), for every GEMM of the process, the anchor's too"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict = {**environment(), "depth": args.depth, "steps": {}, "numerics": {}, "breakdown": {}, "errors": [],
                     "cublaslt_workspace": workspace}
    previous = out_dir / "fp8_step.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        for key in ("steps", "numerics", "breakdown"):
            results[key].update(old.get(key, {}))
        results["gemms"] = old.get("gemms", [])
    results["scaled_mm"] = {str(dtype).removeprefix("torch."): scaled_mm_supported("cuda", dtype)
                            for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    log = StepLog(results, out_dir, "fp8_step", markdown)  # fp8_step.json + fp8_step.md
    save, fail, run_errors = log.save, log.fail, log.run_errors

    def record(label: str, model, timing: dict, profile: bool) -> None:
        results["steps"][label] = {"ms": timing["ms"], "peak_gib": timing["peak_gib"],
                                   "weight_bytes": dit_weight_bytes(model), "resident_bytes": resident_bytes(model),
                                   "first_call_s": timing["first_call_s"]}
        print(f"{label}: {timing['ms']:.1f} ms (first call {timing['first_call_s']:.0f} s)", flush=True)
        if profile and not args.no_profile:
            record_breakdown(results, run_errors, label, timing["step"])

    def run_variants(name: str, model, reference: torch.Tensor | None, numerics: dict, **compile_kwargs) -> None:
        """Eager (optional), compiled and CUDA-graph (optional) steps of the bf16 `model`; numerics vs `reference`.
        compile_kwargs go to compile_model (compile_blocks: temporal_attention, int_act_quant)."""
        eager_out = None
        if args.eager:
            try:
                timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
                record(f"{name} eager", model, timing, False)
                with torch.no_grad():
                    eager_out = timing["step"]()
                if reference is not None:
                    numerics["eager_bf16_vs_fake_fp32"] = relative_l2(eager_out, reference)
                del timing
            except Exception as exc:  # noqa: BLE001
                fail(f"{name} eager", exc)
        label = f"{name} compiled"
        try:
            compile_model(model, mode=args.compile_mode, **compile_kwargs)
            timing = time_step(model, x16, t, y16, mask, args.iters, args.warmup)
            record(label, model, timing, True)
            with torch.no_grad():
                compiled_out = timing["step"]()
            if reference is not None:
                numerics["compiled_bf16_vs_fake_fp32"] = relative_l2(compiled_out, reference)
            if eager_out is not None:
                numerics["compiled_vs_eager_bf16"] = relative_l2(compiled_out, eager_out)
            del timing
            if args.cuda_graph:
                graphed = CUDAGraphForward(model)
                try:
                    timing = time_step(graphed, x16, t, y16, mask, args.iters, args.warmup)
                    record(f"{label}, CUDA graph", model, timing, False)
                    with torch.no_grad():
                        numerics["cuda_graph_vs_compiled_bf16"] = relative_l2(timing["step"](), compiled_out)
                    del timing
                except Exception as exc:  # noqa: BLE001
                    fail(f"{label}, CUDA graph", exc)
                graphed.reset()
        except Exception as exc:  # noqa: BLE001
            fail(label, exc)
        compile_model(model, enabled=False)
        release()
        save()

    def run_fast(name: str, model, reference: torch.Tensor | None, numerics: dict) -> None:
        """The --fast rows of `model` (merged in place: run after its plain rows)."""
        skipped = merge_qkv(model)
        numerics["fast: attentions not merged"] = len(skipped)
        if skipped:
            print(f"{name}: {len(skipped)} attentions not merged, e.g. {next(iter(skipped.items()))}", flush=True)
        if args.permuted_temporal:  # the fast rows before session 12: temporal attention on permuted copies
            for block in model.blocks:
                block.attn_temp.frame_major = False
            run_variants(f"{name} fast, permuted temporal", model, reference, {}, **FAST)
            for block in model.blocks:
                block.attn_temp.frame_major = "auto"
        if args.unfused_residual:  # the fast rows before session 12's residual prologue: residual adds apart
            import t2v.models.stdit as stdit

            fused_residual, stdit.quantize_residual = stdit.quantize_residual, lambda *args, **kwargs: None
            try:
                run_variants(f"{name} fast, residual adds apart", model, reference, {}, **FAST)
            finally:
                stdit.quantize_residual = fused_residual
        if args.mlp_residual_apart:  # the fast rows before the MLP residual add moved into the next block
            model.defer_mlp_residual = False
            try:
                run_variants(f"{name} fast, MLP residual apart", model, reference, {}, **FAST)
            finally:
                model.defer_mlp_residual = True
        fast = {}
        run_variants(f"{name} fast", model, reference, fast, **FAST)
        numerics.update({f"fast: {key}": value for key, value in fast.items()})
        if args.cross_fp8_output:
            for block in model.blocks:
                block.cross_attn.fp8_output = True
            try:
                run_variants(f"{name} fast, cross-attention writes e4m3", model, reference, {}, **FAST)
            finally:
                for block in model.blocks:
                    block.cross_attn.fp8_output = False
        if args.exact_tanh_rows:
            from qdiff.kernels import fused_producers

            fused_producers.HARDWARE_TANH = False
            try:
                run_variants(f"{name} fast, exact tanh", model, reference, {}, **FAST)
            finally:
                fused_producers.HARDWARE_TANH = True
        if args.eager_ends_rows:
            run_variants(f"{name} fast, eager ends", model, reference, {}, **FAST, compile_ends=False)
        if args.sdpa_cross:
            cross = {}
            run_variants(f"{name} fast, SDPA cross-attention", model, reference, cross,
                         **{**FAST, "cross_attention": "sdpa"})
            numerics.update({f"SDPA cross-attention: {key}": value for key, value in cross.items()})
        layers = [layer for _, layer in fp8_layers(model)]
        if args.fast_accum_rows and layers:
            accumulate = {}
            for layer in layers:
                layer.fast_accum = True
            try:
                run_variants(f"{name} fast, fast accumulation", model, reference, accumulate, **FAST)
            finally:
                for layer in layers:
                    layer.fast_accum = args.fast_accum
            numerics.update({f"fast accumulation: {key}": value for key, value in accumulate.items()})

    # the bare bf16 block stack, first: nothing else on the GPU yet
    if Path(args.anchor).is_file():
        try:
            block_ms = anchor_block_ms(load_anchor(Path(args.anchor)))
            results["anchor"] = {"block_ms": block_ms, "step_ms": block_ms * args.depth, "path": args.anchor}
            results["steps"]["anchor: bare bf16 block stack"] = {"ms": block_ms * args.depth}
            print(f"anchor: {block_ms:.2f} ms per block, {block_ms * args.depth:.1f} ms per step", flush=True)
        except Exception as exc:  # noqa: BLE001
            run_errors.append(f"anchor: {exc!r}"[:600])
        release()
    else:
        print(f"no anchor at {args.anchor}: its row is skipped", flush=True)

    # the float32 master model and inputs
    torch.backends.cuda.matmul.allow_tf32 = False  # numerics compare float32 models exactly
    base = build_model(torch.float32)
    base.blocks = base.blocks[:args.depth]
    x32, t, y32, mask = inputs(torch.float32)
    x16, y16 = x32.bfloat16(), y32.bfloat16()
    with torch.no_grad():
        fp_out = base(x32, t, y32, mask=mask)
    base.cpu()

    if "bf16" in args.only:
        try:
            model = copy.deepcopy(base).cuda().to(torch.bfloat16)
            if not (args.fast and args.fast_only):
                run_variants("bf16", model, None, results["numerics"].setdefault("bf16", {}))
            if args.fast:
                run_fast("bf16", model, None, results["numerics"].setdefault("bf16", {}))
            del model
        except Exception as exc:  # noqa: BLE001
            fail("bf16", exc)
        release()
        save()

    for name, yaml_path in (("w8a8_fp8", args.w8a8), ("w4a8_fp8", args.w4a8)):
        if name.split("_")[0] not in args.only:
            continue
        qmodel = fake = None
        try:
            base.cuda()
            qconfig = apply_overrides(QuantConfig.from_yaml(yaml_path), ["distill.enabled=false"])
            prepared = time.time()
            qmodel = quantized_model(base, qconfig, x32, t, y32, mask)
            with torch.no_grad():
                fake = qmodel(x32, t, y32, mask=mask)
                convert_to_int(qmodel)
                fp8_out = qmodel(x32, t, y32, mask=mask)
            numerics = {"config": yaml_path, "fp8_fp32_vs_fake_fp32": relative_l2(fp8_out, fake),
                        "fake_vs_fp": relative_l2(fake, fp_out), "prepare_s": time.time() - prepared}
            results["numerics"][name] = numerics
            del fp8_out
            qmodel.to(torch.bfloat16)  # FP8Linear keeps its e4m3 codes and float32 scales
            for _, layer in fp8_layers(qmodel):
                layer.fast_accum = args.fast_accum
            base.cpu()
            release()
        except Exception as exc:  # noqa: BLE001
            fail(name, exc)
            base.cpu()
            release()
            save()
            continue
        if not (args.fast and args.fast_only):
            run_variants(name, qmodel, fake, numerics)
        if args.fast:
            run_fast(name, qmodel, fake, numerics)
        if name == "w4a8_fp8" and args.cache_w4:
            for _, layer in fp8_layers(qmodel):
                layer.cache_weight = True
                layer.prepare()
            cached = {}
            run_variants(f"{name}, cached e4m3 weights", qmodel, fake, cached)
            numerics.update({f"cached: {key}": value for key, value in cached.items()})
        print(f"{name}: " + ", ".join(f"{key} {value:.2e}" for key, value in numerics.items()
                                       if isinstance(value, float) and key != "prepare_s"), flush=True)
        del qmodel, fake
        release()
        save()
    del base

    if "anchor" in results:  # the anchor again, after the models: how much its time drifts within the process
        try:
            block_ms = anchor_block_ms(load_anchor(Path(args.anchor)))
            results["anchor"]["step_ms_after"] = block_ms * args.depth
            results["steps"]["anchor again, after the models"] = {"ms": block_ms * args.depth}
            print(f"anchor again: {block_ms * args.depth:.1f} ms per step", flush=True)
        except Exception as exc:  # noqa: BLE001
            run_errors.append(f"anchor again: {exc!r}"[:600])
        release()
        save()

    if not args.no_gemm_table:
        try:
            results["gemms"] = gemm_table(max(args.iters, 20), args.warmup)
        except Exception as exc:  # noqa: BLE001
            run_errors.append(f"gemm table: {exc!r}")
    return log.finish(started)


if __name__ == "__main__":
    sys.exit(main())
