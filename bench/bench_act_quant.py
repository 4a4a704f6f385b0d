"""Where the activation quantization of an integer STDiT-XL/2 step loses its time: the per-token quantizers at the
step's shapes, each timed alone as device time (CUDA graphs, so host overhead is not counted; L2 flushed), against
the memory-bound floor.

    python bench/bench_act_quant.py [--out logs/bench/act_quant.json] [--configs] [--fp8]

Shapes: M = 32768 tokens (CFG batch 2 × 16 frames × 1024 patches) with K = 1152 (q/k/v/proj/fc1 inputs) and
K = 4608 (the fc2 input). Variants, W8A8 dynamic per-token asymmetric codes:
- floor: read x (bf16) and write int8 once, `x.to(torch.int8)`; the best any quantizer can do;
- `torch compiled`: `quantize_per_token_torch` (what the compiled integer model runs) with its producer, under
  torch.compile: inductor's fused kernel, as in the step;
- `triton exact` / `triton fast`: our kernel (`quantize_per_token_triton`) with IEEE or approximate division,
  autotuned, and with `--configs` every (ROWS, BLOCK_K, warps) candidate.
With --fp8 the same for per-token e4m3 codes (FP8Linear's input): floor `x.to(torch.float8_e4m3fn)`; `torch
compiled` the plain-torch `quantize_fp8_per_token` (backend "torch") with its producer under torch.compile;
`triton exact` / `fast` `quantize_fp8_per_token_triton`. Codes are compared with the eager torch reference on the
GPU (`*_codes_moved_pct`: e4m3 codes that differ, `*_codes_max_step`: by how many e4m3 steps at most).
Producers: none, LayerNorm + modulate (K = 1152: norm1/norm2 before q/k/v and fc1) and GELU-tanh (K = 4608: fc2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import environment, print_and_save  # noqa: E402

TOKENS, BATCH = 32768, 2


def device_ms(fn) -> float:
    """Median device milliseconds of fn() replayed in a CUDA graph (triton.testing.do_bench_cudagraph)."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=200))


def producer_inputs(kind: str, width: int):
    from qdiff.kernels.fused_producers import GeluTanh, LayerNormModulate

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, width, device="cuda", generator=gen).to(torch.bfloat16)
    if kind == "none":
        return x, None
    if kind == "gelu":
        return x, GeluTanh()
    shift = (torch.randn(BATCH, width, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    scale = (torch.randn(BATCH, width, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
    return x, LayerNormModulate(shift, scale, TOKENS // BATCH)


def compiled_torch_quant(producer):
    """The compiled model's path: the producer's eager ops then `quantize_per_token_torch`, one torch.compile."""
    from qdiff.kernels.act_quant import quantize_per_token_torch

    def run(x):
        y = x if producer is None else producer.apply(x)
        act = quantize_per_token_torch(y, 8)
        return act.codes, act.scale, act.zero, act.rowsum

    return torch.compile(run, dynamic=False)


def fp8_compiled_quant(producer):
    """The compiled FP8 model's path: `quantize_fp8_per_token` in plain torch ops with its producer, one compile."""
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token

    return torch.compile(lambda x: quantize_fp8_per_token(x, producer=producer), dynamic=False)


def time_row(kind: str, width: int, fp8: bool, configs: bool) -> dict:
    """One table row: the floor, inductor's compiled quantization and our kernel (exact, fast) for one shape."""
    import triton

    from qdiff.kernels.act_quant import quantize_per_token_torch, quantize_per_token_triton
    from qdiff.kernels.fp8_quant import e4m3_steps, quantize_fp8_per_token_reference, quantize_fp8_per_token_triton
    from qdiff.kernels.triton_act_quant import AUTOTUNE_CONFIGS
    from qdiff.kernels.triton_fp8_act_quant import FP8_AUTOTUNE_CONFIGS

    x, producer = producer_inputs(kind, width)
    bytes_moved = x.numel() * (2 + 1)  # bf16 in, 8-bit codes out (per-row scalars are negligible)
    row = {"producer": kind, "M": TOKENS, "K": width, "MB_moved": round(bytes_moved / 1e6, 1)}
    if fp8:
        row["floor_ms"] = device_ms(lambda: x.to(torch.float8_e4m3fn))
        compiled = fp8_compiled_quant(producer)
        reference = quantize_fp8_per_token_reference(x, None, producer)[0]

        def kernel(fast, config=None):
            return quantize_fp8_per_token_triton(x, None, producer, config=config, fast=fast)

        def moved(quantized):
            return e4m3_steps(quantized[0], reference)
    else:
        row["floor_ms"] = device_ms(lambda: x.to(torch.int8))
        compiled = compiled_torch_quant(producer)
        reference = quantize_per_token_torch(x if producer is None else producer.apply(x), 8).codes.int()

        def kernel(fast, config=None):
            return quantize_per_token_triton(x, 8, producer=producer, config=config, fast=fast)

        def moved(act):
            return (act.codes.int() - reference).abs()
    compiled(x)
    row["torch_compiled_ms"] = device_ms(lambda: compiled(x))
    for fast in (False, True):
        name = "triton_fast" if fast else "triton_exact"
        steps = moved(kernel(fast))  # autotunes
        row[f"{name}_ms"] = device_ms(lambda: kernel(fast))
        row[f"{name}_codes_moved_pct"] = round(100 * (steps > 0).float().mean().item(), 3)
        row[f"{name}_codes_max_step"] = int(steps.max().item())
        if configs:
            per_config = {}
            for config in FP8_AUTOTUNE_CONFIGS if fp8 else AUTOTUNE_CONFIGS:
                if config[1] > max(triton.next_power_of_2(width), 128):
                    continue
                try:
                    per_config[str(config)] = round(device_ms(lambda: kernel(fast, config)), 4)
                except Exception as error:  # a config that does not compile is a result too
                    per_config[str(config)] = f"error: {type(error).__name__}"
            row[f"{name}_per_config_ms"] = per_config
    for key in [k for k, v in row.items() if k.endswith("_ms") and isinstance(v, float)]:
        row[key] = round(row[key], 4)
        row[key.replace("_ms", "_GBps")] = round(bytes_moved / row[key] / 1e6) if row[key] else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--configs", action="store_true", help="also time every kernel config (no autotuning)")
    parser.add_argument("--fp8", action="store_true", help="per-token e4m3 codes (FP8Linear) instead of int8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant.py times GPU kernels: no CUDA device here")
    rows = []
    for kind, width in (("none", 1152), ("layernorm_modulate", 1152), ("none", 4608), ("gelu", 4608)):
        rows.append(time_row(kind, width, args.fp8, args.configs))
        print(rows[-1], flush=True)
    print_and_save({"environment": environment(), "codes": "e4m3" if args.fp8 else "int8", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
