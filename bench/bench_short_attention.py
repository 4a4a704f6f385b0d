"""The temporal attention of one STDiT-XL/2 block at 16x512x512 (CFG batch 2) alone: from the q, k, v linears' outputs
[B' = 2048, N = 16, C = 1152] (16 heads of 72, bf16) to the [B', N, C] input of `proj`, each variant timed as device
time (one CUDA graph per variant, `triton.testing.do_bench_cudagraph`: no host overhead) and as CUDA events around
eager calls (host overhead included), with the bandwidth that the minimal traffic implies (read q, k, v once, write
the output once: 4·B'·N·C·2 bytes ≈ 302 MB).

    python bench/bench_short_attention.py --out logs/bench/short_attention.md            # + short_attention.json
    python bench/bench_short_attention.py --configs --out logs/bench/short_attention.md  # every kernel config too

Variants (each in its own try/except; its max |error| vs the float32 reference is reported):
  sdpa                 F.scaled_dot_product_attention on [B', h, N, d] views (torch's choice of backend), the
                       output back to [B', N, C] (as `Attention.core = "sdpa"` runs it)
  sdpa flash / cudnn / efficient / math   the same with one SDPA backend forced
  math eager           `t2v.models.stdit._math_attention` (bmm, float32 softmax, bmm; `core = "math"`)
  math compiled        the same under torch.compile (inductor; what `compile_blocks` runs by default)
  triton (P, W)        `qdiff.kernels.short_attention.short_attention_triton`, P (row, head) problems per program and
                       W warps; the default config, and with --configs every one of its `CONFIGS`
Needs a CUDA GPU and triton (--help works anywhere). Results are facts of one run on one machine: compare rows of
one run only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import (DTYPES, attention_table, environment, time_attention_variants,  # noqa: E402
                          write_attention_report)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B', N, C] -> [B', h, N, d] view."""
    rows, seq, channels = t.shape
    return t.view(rows, seq, heads, channels // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[B', h, N, d] -> [B', N, C] contiguous."""
    rows, heads, seq, head_dim = t.shape
    return t.transpose(1, 2).reshape(rows, seq, heads * head_dim)


def variants(heads: int, all_configs: bool) -> list[tuple[str, object]]:
    """(label, fn(q, k, v) -> [B', N, C]) of every variant."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qdiff.kernels.short_attention import CONFIGS, DEFAULT_CONFIG, short_attention_triton
    from t2v.models.stdit import _math_attention

    def sdpa(backend=None):
        def run(q, k, v):
            q, k, v = (split_heads(t, heads) for t in (q, k, v))
            if backend is None:
                return merge_heads(F.scaled_dot_product_attention(q, k, v))
            with sdpa_kernel(backend):
                return merge_heads(F.scaled_dot_product_attention(q, k, v))
        return run

    def math(q, k, v):
        return merge_heads(_math_attention(*(split_heads(t, heads) for t in (q, k, v))))

    out = [("sdpa", sdpa())]
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        out.append((f"sdpa {name}", sdpa(backend)))
    out += [("math eager", math), ("math compiled", torch.compile(math, dynamic=False))]
    for config in (CONFIGS if all_configs else (DEFAULT_CONFIG,)):
        label = f"triton {config}" + (" (default)" if config == DEFAULT_CONFIG else "")
        out.append((label, lambda q, k, v, config=config: short_attention_triton(q, k, v, heads, config=config)))
    return out


def markdown(results: dict) -> str:
    shape = results["shape"]
    lines = [f"# Temporal attention alone: [{shape['rows']}, {shape['seq']}, {shape['heads']}x{shape['head_dim']}] "
             f"{shape['dtype']}, {shape['MB_moved']:.0f} MB moved at least — {results['device']}, torch "
             f"{results['torch']}, triton {results.get('triton', '?')}, {results['date']}", "",
             *attention_table(results["rows"])]
    lines += ["", "GB/s = minimal bytes (q, k, v read once, output written once) / device time. Same run, same "
              "inputs for every row."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write (the JSON goes beside it, .json)")
    p.add_argument("--rows", type=int, default=2048, help="B' = batch · spatial tokens (default 2 · 1024)")
    p.add_argument("--seq", type=int, default=16, help="N, frames (≤ 32)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=72)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--configs", action="store_true", help="time every Triton config (CONFIGS), not only the default")
    p.add_argument("--iters", type=int, default=50, help="CUDA-event timings per variant")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_short_attention times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    from qdiff.kernels.short_attention import short_attention_reference

    dtype = DTYPES[args.dtype]
    channels = args.heads * args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(args.rows, args.seq, channels, device="cuda", generator=gen).to(dtype) for _ in range(3))
    reference = short_attention_reference(q, k, v, args.heads).float()
    bytes_moved = 4 * q.numel() * q.element_size()
    results = {**environment(), "shape": {"rows": args.rows, "seq": args.seq, "heads": args.heads,
                                          "head_dim": args.head_dim, "dtype": args.dtype,
                                          "MB_moved": bytes_moved / 1e6}, "rows": []}
    results["rows"] = time_attention_variants(variants(args.heads, args.configs), (q, k, v), reference,
                                              bytes_moved, args.iters)
    return write_attention_report(args.out, results, markdown)

if __name__ == "__main__":
    sys.exit(main())
