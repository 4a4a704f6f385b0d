"""Which SDPA kernel is fastest for STDiT-XL/2's spatial attention: q, k, v [B·T, heads, S, d] = [32, 16, 1024, 72]
in bf16 (CFG batch 2 × 16 frames, 1024 patches, head dim 72), forward only, each backend forced in turn with
`torch.nn.attention.sdpa_kernel`, plus the default choice. Also the temporal-shaped [B·S, 16, 16, 72] for reference.

    python bench/bench_spatial_attention.py [--out logs/bench/spatial_attention.json]

Reports ms per call (median of CUDA-event timings), TFLOP/s (4·B·h·N²·d / time) and the max difference to the math
backend in float32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import cuda_time, environment, print_and_save  # noqa: E402

SHAPES = {"spatial": (32, 16, 1024, 72), "temporal": (2 * 1024, 16, 16, 72)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_spatial_attention.py times CUDA kernels: no CUDA device here")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    results = {"environment": environment(), "shapes": {}}
    for shape_name, shape in SHAPES.items():
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * shape[0] * shape[1] * shape[2] ** 2 * shape[3]
        rows = {}
        for name, backend in backends.items():
            def call(backend=backend):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            try:
                ms = cuda_time(call, args.iters, args.warmup)
                error = (call().float() - reference).abs().max().item()
                rows[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "max_abs_err": error}
            except Exception as exc:  # noqa: BLE001  (a backend that refuses the shape)
                rows[name] = {"error": repr(exc)[:200]}
            print(shape_name, name, rows[name], flush=True)
        results["shapes"][shape_name] = {"shape": list(shape), "backends": rows}
    print_and_save(results, args.out)


if __name__ == "__main__":
    main()
