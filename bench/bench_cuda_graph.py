"""Compiled STDiT-XL/2 steps with and without `qdiff.cuda_graphs.CUDAGraphForward`, side by side in one process:
bf16 and the W8A8 integer model (compiled with inductor's act quant, `torch`, and with our fused Triton op,
`fused`). One step at 16x512x512, CFG batch 2, random weights; W8A8 from `configs/quant/w8a8_qvdit.yaml`.

    python bench/bench_cuda_graph.py [--depth 28] [--modes torch,fused] [--iters 10] [--out logs/bench/cuda_graph.json]

Reports ms per step (median of CUDA-event timings), the first call's seconds (compilation), the capture's seconds,
and the relative L2 between the replayed and the compiled output (0 = bit-identical). --depth N keeps the first N
blocks (a quick check). Needs a CUDA GPU and triton.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import build_model, environment, inputs, print_and_save  # noqa: E402


def time_pair(model, x, t, y, mask, iters: int) -> dict:
    """The compiled model and its CUDA-graph replay: ms per step, first-call and capture seconds, rel L2."""
    from bench.bench_int_step import relative_l2, time_step
    from qdiff.cuda_graphs import CUDAGraphForward

    graphed = CUDAGraphForward(model)
    compiled = time_step(model, x, t, y, mask, iters, 3)  # first call: compilation
    replayed = time_step(graphed, x, t, y, mask, iters, 3)  # first call: warm-up + capture
    with torch.no_grad():
        rel_l2 = relative_l2(replayed["step"](), compiled["step"]())
    graphed.reset()
    return {"compiled_ms": compiled["ms"], "cuda_graph_ms": replayed["ms"], "first_call_s": compiled["first_call_s"],
            "capture_s": replayed["first_call_s"], "rel_l2_graph_vs_compiled": rel_l2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=28, help="blocks kept (28 = the whole STDiT-XL/2)")
    parser.add_argument("--modes", default="torch,fused", help="W8A8 int_act_quant modes to time (comma-separated)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_graph.py times CUDA graphs: no CUDA device here")
    from bench.bench_int_step import quantized_model
    from qdiff.api import compile_model
    from qdiff.config import QuantConfig, apply_overrides
    from qdiff.lowbit import convert_to_int

    base = build_model(torch.float32)
    base.blocks = base.blocks[:args.depth]
    x32, t, y32, mask = inputs(torch.float32)
    x16, y16 = x32.bfloat16(), y32.bfloat16()
    results = {**environment(), "depth": args.depth, "variants": {}}

    def report(label: str, row: dict) -> None:
        results["variants"][label] = row
        print(f"{label}: compiled {row['compiled_ms']:.2f} ms, CUDA graph {row['cuda_graph_ms']:.2f} ms, "
              f"rel L2 {row['rel_l2_graph_vs_compiled']:.2e}", flush=True)

    model = compile_model(copy.deepcopy(base).to(torch.bfloat16))
    report("bf16", time_pair(model, x16, t, y16, mask, args.iters))
    del model
    torch._dynamo.reset()
    qconfig = apply_overrides(QuantConfig.from_yaml(REPO / "configs/quant/w8a8_qvdit.yaml"), ["distill.enabled=false"])
    qmodel = quantized_model(base, qconfig, x32, t, y32, mask)
    with torch.no_grad():
        convert_to_int(qmodel)
    qmodel.to(torch.bfloat16)
    for mode in [m for m in args.modes.split(",") if m]:
        compile_model(qmodel, int_act_quant=mode)
        report(f"w8a8 int, act quant {mode}", time_pair(qmodel, x16, t, y16, mask, args.iters))
        compile_model(qmodel, enabled=False)
        torch._dynamo.reset()
    print_and_save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
