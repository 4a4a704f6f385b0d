"""The cross-attention of one STDiT-XL/2 block at 16x512x512 (CFG batch 2) alone: from the q linear's output
[B = 2, N = 16·32·32 = 16384, C = 1152] and the two halves k, v [B, L = 120, C] of kv_linear's [B, L, 2C] output,
with a key mask (another number of valid text tokens per sample), to the [B, N, C] input of `proj` (16 heads of 72,
bf16). Each variant is timed as device time (one CUDA graph per variant, `triton.testing.do_bench_cudagraph`: no
host overhead) and as CUDA events around eager calls (host overhead included), with the bandwidth that the minimal
traffic implies (read q once, write the output once, k and v once: ≈ 2·B·N·C·2 bytes ≈ 151 MB, ~0.05 ms on an
H100).

    python bench/bench_cross_attention.py --out logs/bench/cross_attention.md            # + cross_attention.json
    python bench/bench_cross_attention.py --configs --out logs/bench/cross_attention.md  # every kernel config too

Variants (each in its own try/except; its max |error| vs the float32 reference is reported):
  sdpa                 `t2v.models.stdit._attention` (SDPA, torch's choice of backend: cuDNN on an H100) on
                       [B, h, rows, d] views with the [B, 1, 1, L] mask, the output back to [B, N, C] (as
                       `MultiHeadCrossAttention.core = "sdpa"` runs it)
  sdpa cudnn / efficient / math   the same with one SDPA backend forced (flash takes no mask)
  triton (M, W)        `qdiff.kernels.cross_attention.cross_attention_triton` with BLOCK_M = M and W warps; the
                       default config, and with --configs every one of its `CONFIGS`
  sdpa + fp8 quant     sdpa, then the per-token e4m3 quantization of its output for an FP8 proj (the Triton kernel
                       of `quantize_fp8_per_token`, fast division, as compiled fused layers run it)
  triton fp8 (M, W)    `cross_attention_fp8_triton`: the kernel with that quantization fused (fast)
  triton [fp8] autotuned  the kernel without a config: autotuned over its CONFIGS (what the model runs)
The fp8 rows' error is that of the dequantized codes; their GB/s use the same byte count as the others.
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


def variants(heads: int, all_configs: bool) -> list[tuple[str, object]]:
    """(label, fn(q, k, v, key_mask) -> [B, N, C]) of every variant."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qdiff.kernels.cross_attention import (CONFIGS, DEFAULT_CONFIG, cross_attention_fp8_triton,
                                               cross_attention_triton)
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token
    from t2v.models.stdit import _attention

    def sdpa(backend=None):
        def run(q, k, v, key_mask):
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, h, rows, d]
            mask = key_mask[:, None, None, :]
            if backend is None:
                return _attention(q, k, v, mask).transpose(1, 2).flatten(2)
            with sdpa_kernel(backend):
                return _attention(q, k, v, mask).transpose(1, 2).flatten(2)
        return run

    out = [("sdpa", sdpa())]
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        out.append((f"sdpa {name}", sdpa(backend)))
    for config in (CONFIGS if all_configs else (DEFAULT_CONFIG,)):
        label = f"triton {config}" + (" (default)" if config == DEFAULT_CONFIG else "")
        out.append((label, lambda q, k, v, m, config=config: cross_attention_triton(q, k, v, m, heads, config=config)))

    def sdpa_fp8(q, k, v, key_mask):
        result = sdpa()(q, k, v, key_mask)
        return quantize_fp8_per_token(result.reshape(-1, result.shape[-1]), backend="triton", fast=True)

    out.append(("sdpa + fp8 quant", sdpa_fp8))
    out.append(("triton autotuned", lambda q, k, v, m: cross_attention_triton(q, k, v, m, heads)))
    out.append(("triton fp8 autotuned", lambda q, k, v, m: cross_attention_fp8_triton(q, k, v, m, heads, fast=True)))
    for config in (CONFIGS if all_configs else (DEFAULT_CONFIG,)):
        label = f"triton fp8 {config}" + (" (default)" if config == DEFAULT_CONFIG else "")
        out.append((label, lambda q, k, v, m, config=config:
                    cross_attention_fp8_triton(q, k, v, m, heads, fast=True, config=config)))
    return out


def markdown(results: dict) -> str:
    shape = results["shape"]
    lines = [f"# Cross-attention alone: q [{shape['batch']}, {shape['queries']}, {shape['heads']}x{shape['head_dim']}] "
             f"against L = {shape['keys']} keys (valid {shape['valid']}), {shape['dtype']}, {shape['MB_moved']:.0f} MB "
             f"moved at least — {results['device']}, torch {results['torch']}, triton {results.get('triton', '?')}, "
             f"{results['date']}", "",
             *attention_table(results["rows"])]
    lines += ["", "GB/s = minimal bytes (q read once, output written once, k and v read once) / device time. Same "
              "run, same inputs for every row."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write (the JSON goes beside it, .json)")
    p.add_argument("--batch", type=int, default=2, help="B (CFG batch)")
    p.add_argument("--queries", type=int, default=16384,
                   help="N, video tokens per sample (16·32·32 at 16x512x512)")
    p.add_argument("--keys", type=int, default=120, help="L, padded text tokens (≤ 128)")
    p.add_argument("--valid", type=int, nargs="+", default=[120, 37],
                   help="valid text tokens per sample, cycled over the batch")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head_dim", type=int, default=72)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--configs", action="store_true", help="time every Triton config (CONFIGS), not only the default")
    p.add_argument("--iters", type=int, default=50, help="CUDA-event timings per variant")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_attention times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    from qdiff.kernels.cross_attention import cross_attention_reference

    dtype = DTYPES[args.dtype]
    channels = args.heads * args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(args.batch, args.queries, channels, device="cuda", generator=gen).to(dtype)
    k, v = torch.randn(args.batch, args.keys, 2 * channels, device="cuda", generator=gen).to(dtype).chunk(2, dim=-1)
    valid = torch.tensor([args.valid[b % len(args.valid)] for b in range(args.batch)], device="cuda")
    key_mask = torch.arange(args.keys, device="cuda")[None] < valid[:, None]
    reference = cross_attention_reference(q, k, v, key_mask, args.heads).float()
    bytes_moved = (2 * q.numel() + 2 * k.numel()) * q.element_size()
    results = {**environment(), "shape": {"batch": args.batch, "queries": args.queries, "keys": args.keys,
                                          "valid": valid.tolist(), "heads": args.heads, "head_dim": args.head_dim,
                                          "dtype": args.dtype, "MB_moved": bytes_moved / 1e6}, "rows": []}
    results["rows"] = time_attention_variants(variants(args.heads, args.configs), (q, k, v, key_mask), reference,
                                              bytes_moved, args.iters)
    return write_attention_report(args.out, results, markdown)

if __name__ == "__main__":
    sys.exit(main())
