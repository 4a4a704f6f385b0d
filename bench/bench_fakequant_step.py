"""Speed of one STDiT-XL/2 denoising step at 16x512x512 (CFG batch 2) in bf16: our bf16 model vs the same
model with W4A8 fake quantization + TQE (the simulation that calibration and research run), in one process.

Variants timed (median of CUDA-event timings after warm-up):
  bf16                     our STDiT, no quantization
  w4a8_tqe                 W4A8 Q-VDiT config: weights re-quantized every forward (W + B·A -> Q -> + B_out·A_out,
                           one fused Triton pass per layer), per-token dynamic activation fake quant (fused
                           Triton kernel, once per input shared by q/k/v), fused per-frame TQE term
  w4a8_tqe_eager_weight    ablation: the weight chain and the per-frame term as eager ops (as before the fused kernels)
  w4a8_tqe_no_shared_input ablation: q/k/v each quantize their shared input
  w4a8_tqe_eager_act       ablation: eager (unfused) per-token fake quant
  w4a8_folded              weights folded once (W_eff materialised), activations fake-quantized: quantized inference
Prints a table and writes JSON to --out. Needs a CUDA GPU.

    python bench/bench_fakequant_step.py --out logs/bench/fakequant.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import build_model, cuda_time, environment, inputs, print_and_save  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant_config", default=str(REPO / "configs/quant/w4a8_qvdit.yaml"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fakequant_step needs a CUDA GPU", file=sys.stderr)
        return 2

    from qdiff.api import fold_model, init_weight_quantizers, quantize_model, set_quant_state
    from qdiff.config import QuantConfig
    from qdiff.kernels import fake_quant as fq

    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    model = build_model(dtype)
    x, t, y, mask = inputs(dtype)
    results = {}

    def step():
        with torch.no_grad():
            return model(x, t, y, mask=mask)

    torch.cuda.reset_peak_memory_stats()
    results["bf16_ms"] = cuda_time(step, args.iters, args.warmup)
    results["bf16_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ref = step().float()
    print(f"bf16 step: {results['bf16_ms']:.1f} ms", flush=True)

    qcfg = QuantConfig.from_yaml(args.quant_config)
    t0 = time.time()
    quantize_model(model, qcfg, adapter="stdit")
    set_quant_state(model, weight=True, act=True)
    init_weight_quantizers(model)
    torch.cuda.synchronize()
    results["weight_init_s"] = time.time() - t0
    with torch.no_grad():  # non-zero TQE terms, as after distillation
        for m in model.modules():
            if getattr(m, "lora_b", None) is not None:
                m.lora_b.normal_(0, 1e-4)
                m.lora_b_out.normal_(0, 1e-4)
    torch.cuda.reset_peak_memory_stats()
    results["w4a8_tqe_ms"] = cuda_time(step, args.iters, args.warmup)
    results["w4a8_tqe_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out_q = step().float()
    results["w4a8_rel_err_vs_bf16"] = ((out_q - ref).norm() / ref.norm()).item()
    print(f"w4a8 fake quant + TQE: {results['w4a8_tqe_ms']:.1f} ms", flush=True)

    # Ablations: switch one fused piece back to its eager form at a time.
    from qdiff.layers.quant_linear import QuantLinear
    from qdiff.quantizers import uniform

    saved_tracks = QuantLinear._tracks_grad
    QuantLinear._tracks_grad = lambda self: True
    results["w4a8_tqe_eager_weight_ms"] = cuda_time(step, args.iters, args.warmup)
    results["eager_weight_vs_fused_rel"] = ((step().float() - out_q).norm() / out_q.norm()).item()
    QuantLinear._tracks_grad = saved_tracks
    print(f"w4a8 eager weight path: {results['w4a8_tqe_eager_weight_ms']:.1f} ms", flush=True)

    saved_memo = uniform._shared_input_fake_quant
    uniform._shared_input_fake_quant = fq.fake_quant_per_token  # q/k/v quantize their shared input 3 times
    results["w4a8_tqe_no_shared_input_ms"] = cuda_time(step, args.iters, args.warmup)
    uniform.fake_quant_per_token = fq.fake_quant_per_token_reference
    uniform._shared_input_fake_quant = fq.fake_quant_per_token_reference  # eager per-token fake quant
    results["w4a8_tqe_eager_act_ms"] = cuda_time(step, args.iters, args.warmup)
    results["eager_vs_fused_max_abs_diff"] = (step().float() - out_q).abs().max().item()
    uniform.fake_quant_per_token = fq.fake_quant_per_token
    uniform._shared_input_fake_quant = saved_memo
    print(f"w4a8 no shared-input memo: {results['w4a8_tqe_no_shared_input_ms']:.1f} ms; "
          f"eager act fake quant: {results['w4a8_tqe_eager_act_ms']:.1f} ms", flush=True)

    # The per-token kernel alone at the two activation widths of the model, against a copy.
    for cols in (1152, 4608):
        xa = torch.randn(32768, cols, device="cuda", dtype=dtype)
        copy_ms = cuda_time(lambda: xa.clone(), 20, 5)
        results[f"copy_{cols}_gbps"] = 2 * xa.numel() * xa.element_size() / copy_ms / 1e6
        ms = cuda_time(lambda: fq.fake_quant_per_token(xa, 8), 20, 5)
        results[f"act_kernel_{cols}_gbps"] = 2 * xa.numel() * xa.element_size() / ms / 1e6

    fold_model(model)
    torch.cuda.reset_peak_memory_stats()
    results["w4a8_folded_ms"] = cuda_time(step, args.iters, args.warmup)
    results["w4a8_folded_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["folded_vs_unfolded_rel"] = ((step().float() - out_q).norm() / out_q.norm()).item()

    for key in ("w4a8_tqe_ms", "w4a8_tqe_eager_weight_ms", "w4a8_tqe_no_shared_input_ms", "w4a8_tqe_eager_act_ms",
                "w4a8_folded_ms"):
        results[key.replace("_ms", "_over_bf16")] = results[key] / results["bf16_ms"]
    results.update(environment())
    print_and_save(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
