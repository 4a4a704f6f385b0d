"""Where the activation quantization of an integer STDiT-XL/2 step loses its time: the per-token quantizers at the
step's shapes, each timed alone as device time (CUDA graphs, so host overhead is not counted; L2 flushed), against
the memory-bound floor.

    python bench/bench_act_quant.py [--out logs/bench/act_quant.json] [--configs]

Shapes: M = 32768 tokens (CFG batch 2 × 16 frames × 1024 patches) with K = 1152 (q/k/v/proj/fc1 inputs) and
K = 4608 (the fc2 input). Variants, W8A8 dynamic per-token asymmetric codes:
- floor: read x (bf16) and write int8 once, `x.to(torch.int8)`; the best any quantizer can do;
- `torch compiled`: `quantize_per_token_torch` (what the compiled integer model runs) with its producer, under
  torch.compile: inductor's fused kernel, as in the step;
- `triton exact` / `triton fast`: our kernel (`quantize_per_token_triton`) with IEEE or approximate division,
  autotuned, and with `--configs` every (ROWS, BLOCK_K, warps) candidate.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--configs", action="store_true", help="also time every kernel config (no autotuning)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant.py times GPU kernels: no CUDA device here")
    import triton

    from qdiff.kernels.act_quant import quantize_per_token_torch, quantize_per_token_triton
    from qdiff.kernels.triton_act_quant import AUTOTUNE_CONFIGS

    rows = []
    for kind, width in (("none", 1152), ("layernorm_modulate", 1152), ("none", 4608), ("gelu", 4608)):
        x, producer = producer_inputs(kind, width)
        bytes_moved = x.numel() * (2 + 1)  # bf16 in, int8 codes out (per-row scalars are negligible)
        row = {"producer": kind, "M": TOKENS, "K": width, "MB_moved": round(bytes_moved / 1e6, 1)}
        row["floor_ms"] = device_ms(lambda: x.to(torch.int8))
        compiled = compiled_torch_quant(producer)
        compiled(x)
        row["torch_compiled_ms"] = device_ms(lambda: compiled(x))
        reference = quantize_per_token_torch(x if producer is None else producer.apply(x), 8)
        for fast in (False, True):
            name = "triton_fast" if fast else "triton_exact"
            act = quantize_per_token_triton(x, 8, producer=producer, fast=fast)  # autotunes
            row[f"{name}_ms"] = device_ms(lambda: quantize_per_token_triton(x, 8, producer=producer, fast=fast))
            moved = (act.codes.int() - reference.codes.int()).abs()
            row[f"{name}_codes_moved_pct"] = round(100 * (moved > 0).float().mean().item(), 3)
            row[f"{name}_codes_max_step"] = int(moved.max().item())
            if args.configs:
                per_config = {}
                for config in AUTOTUNE_CONFIGS:
                    if config[1] > max(triton.next_power_of_2(width), 128):
                        continue
                    try:
                        per_config[str(config)] = round(device_ms(lambda: quantize_per_token_triton(
                            x, 8, producer=producer, fast=fast, config=config)), 4)
                    except Exception as error:  # a config that does not compile is a result too
                        per_config[str(config)] = f"error: {type(error).__name__}"
                row[f"{name}_per_config_ms"] = per_config
        for key in [k for k, v in row.items() if k.endswith("_ms") and isinstance(v, float)]:
            row[key] = round(row[key], 4)
            row[key.replace("_ms", "_GBps")] = round(bytes_moved / row[key] / 1e6) if row[key] else None
        rows.append(row)
        print(row, flush=True)
    print_and_save({"environment": environment(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
