"""Where one STDiT-XL/2 step (16x512x512, CFG batch 2, bf16) spends its GPU time: torch.profiler tables for
the bf16 model and the W4A8 fake-quant model, plus the per-token fake-quant kernel's bandwidth.

    python bench/profile_step.py [--rows 25] [--compile]

--compile profiles each model eager and then compiled (`t2v.models.stdit.compile_blocks`; the first compiled call,
which compiles, runs before the profiled one). The integer models: bench/bench_int_step.py (its breakdown).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import build_model, cuda_time, inputs  # noqa: E402


def profile(fn, rows: int, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"\n=== {title} ===")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def kernel_bandwidth() -> None:
    from qdiff.kernels.fake_quant import fake_quant_per_token, fake_quant_per_token_reference

    for cols in (1152, 4608):
        x = torch.randn(32768, cols, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * x.numel() * x.element_size()
        t_fused = cuda_time(lambda: fake_quant_per_token(x, 8), 20, 5)
        t_eager = cuda_time(lambda: fake_quant_per_token_reference(x, 8), 20, 5)
        t_copy = cuda_time(lambda: x.clone(), 20, 5)
        print(f"fake quant [32768, {cols}] bf16: fused {t_fused:.3f} ms ({nbytes / t_fused / 1e6:.0f} GB/s), "
              f"eager {t_eager:.3f} ms, clone {t_copy:.3f} ms ({nbytes / t_copy / 1e6:.0f} GB/s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--quant_config", default=str(REPO / "configs/quant/w4a8_qvdit.yaml"))
    p.add_argument("--compile", action="store_true", help="also profile each model compiled (compile_blocks)")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode for --compile")
    args = p.parse_args(argv)
    from qdiff.api import fold_model, init_weight_quantizers, quantize_model, set_quant_state
    from qdiff.config import QuantConfig
    from t2v.models.stdit import compile_blocks

    kernel_bandwidth()
    model = build_model(torch.bfloat16)
    x, t, y, mask = inputs(torch.bfloat16)

    def step():
        with torch.no_grad():
            model(x, t, y, mask=mask)

    def profile_both(title: str) -> None:
        profile(step, args.rows, title)
        if args.compile:
            try:
                compile_blocks(model, mode=args.compile_mode)
                profile(step, args.rows, f"{title}, compiled")
            except Exception as exc:  # noqa: BLE001 - report and go on with the eager profiles
                print(f"\n=== {title}, compiled: FAILED {exc!r} ===")
            compile_blocks(model, enabled=False)
            torch._dynamo.reset()

    profile_both("bf16 step")
    quantize_model(model, QuantConfig.from_yaml(args.quant_config), adapter="stdit")
    set_quant_state(model, weight=True, act=True)
    init_weight_quantizers(model)
    profile_both("w4a8 fake quant + TQE (unfolded)")
    fold_model(model)
    profile_both("w4a8 folded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
