"""Multi-head cross-attention of many queries against a few keys (STDiT's cross-attention at inference: 32768 video
tokens per sample against L = 120 padded text tokens), straight from the q and kv linears' outputs.

    out[b, n, h·d:(h+1)·d] = Σ_j softmax_j(q_h[b, n]·k_h[b, j] / √d) · v_h[b, j]   (masked keys excluded)

with q_h = q[..., h·d:(h+1)·d] (d = C / heads). q [B, N, C], k, v [B, L, C] (any batch and row strides, channel
stride 1: q may be a view of a wider tensor, k and v the two halves of kv_linear's [B, L, 2C] output), key_mask
[B, L] bool (True = attend) or None (all keys valid) -> out [B, N, C] contiguous in q's dtype. L ≤ 128, d ≤ 128.
Every sample must have at least one valid key (STDiT checks it when it pads the text, `STDiT._pad_text`): a row
with every key masked has no defined softmax (NaN from the reference and from the kernel).

- `cross_attention_reference`: the definition in PyTorch (float32 math, the result cast to q's dtype).
- `cross_attention_triton`: one Triton kernel (`qdiff.kernels.triton_cross_attention`): each program takes a
  [BLOCK_M, C] tile of query rows and loops over the heads, each head's whole K and V in one tile; float32 scores
  and softmax, float32 accumulation; bf16, fp16 or fp32 in and out.
- `cross_attention_fp8` (`_reference`, `_triton`): the same with the output quantized per token to e4m3 for an FP8
  linear, inside the kernel (opt-in for STDiT: measured slower than the kernel plus the separate quantization).
- `cross_attention`: the dispatch: Triton on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (Triton's
  interpreter, for tests); the reference elsewhere, and whenever autograd needs a gradient (the kernel is for
  inference). Under torch.compile it records the custom op `torch.ops.qdiff.cross_attention` (`qdiff.kernels.ops`),
  one opaque call that CUDA graphs can capture.
"""
from __future__ import annotations

import math

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.act_quant import interpret_mode, load_triton_kernels, triton_usable
from qdiff.kernels.fp8_quant import FP8_DTYPE, quantize_fp8_per_token

MAX_KEYS = 128  # longest text the kernel takes (one program holds all of a head's keys)
MAX_HEAD_DIM = 128
# (BLOCK_M, num_warps) of the kernel: the default (the fastest in bf16 on an H100, docs/benchmarks.md session 15), and
# the candidates that bench/bench_cross_attention.py --configs times. A launch without a config is autotuned over
# CONFIGS (the interpreter takes the default).
DEFAULT_CONFIG = (128, 8)
CONFIGS = ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))  # = triton_cross_attention.AUTOTUNE_CONFIGS
QUANT_CHUNK = 256  # channels per piece when the kernel reads its rows back to quantize them
BACKENDS = ("auto", "torch", "triton")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
           num_heads: int) -> tuple[int, int, int, int]:
    """(B, N, L, head_dim) of valid arguments; raises otherwise."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"cross_attention: expected q [B, N, C] and k, v [B, L, C], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cross_attention: q, k, v must share one of float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    batch, queries, channels = q.shape
    keys = k.shape[1]
    if not 1 <= keys <= MAX_KEYS:
        raise ValueError(f"cross_attention: L = {keys} keys, expected 1 to {MAX_KEYS}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (batch, keys)):
        raise ValueError(f"cross_attention: key_mask must be bool [B, L] = [{batch}, {keys}], got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"cross_attention: C = {channels} is not divisible by num_heads = {num_heads}")
    if channels // num_heads > MAX_HEAD_DIM:
        raise ValueError(f"cross_attention: head_dim = {channels // num_heads} > {MAX_HEAD_DIM}")
    return batch, queries, keys, channels // num_heads


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                              num_heads: int) -> torch.Tensor:
    """The definition: q [B, N, C], k, v [B, L, C], key_mask [B, L] bool or None -> [B, N, C] contiguous in q's dtype,
    per head in float32."""
    batch, _, _, head_dim = _check(q, k, v, key_mask, num_heads)

    def heads(t):  # [B, rows, C] -> [B, h, rows, d] float32
        return t.float().reshape(batch, t.shape[1], num_heads, head_dim).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-2, -1) * head_dim**-0.5  # [B, h, N, L]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ heads(v)  # [B, h, N, d]
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype).contiguous()


def head_pieces(head_dim: int) -> tuple[int, int]:
    """(D_MAIN, D_TAIL) of the kernel: a head's channels as a power-of-two piece (≥ 16, `tl.dot`'s least
    width) and, when that leaves channels over, a power-of-two tail piece (≥ 16, masked): 72 -> (64, 16),
    128 -> (128, 0), 24 -> (16, 16), 8 -> (16, 0)."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, 1 << (rest - 1).bit_length()) if rest > 0 else 0)


def _launch(q, k, v, key_mask, num_heads, config, fast=None):
    """Run the kernel; fast None: out [B, N, C], else (codes [B·N, C] e4m3, scale [B·N, 1])."""
    batch, queries, keys, head_dim = _check(q, k, v, key_mask, num_heads)
    tensors = (q, k, v) if key_mask is None else (q, k, v, key_mask)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"cross_attention: inputs on different devices: {[str(t.device) for t in tensors]}")
    import triton

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # with fast given: the kernel's scratch
    rows = batch * queries
    codes = scale = None
    if fast is not None:
        codes = torch.empty(rows, q.shape[2], dtype=FP8_DTYPE, device=q.device)
        scale = torch.empty(rows, 1, dtype=torch.float32, device=q.device)
    if rows == 0:
        return out if fast is None else (codes, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # a bool mask as bytes (the kernel tests != 0); without one the pointer is never read
    mask = out if key_mask is None else key_mask.contiguous().view(torch.uint8)
    main, tail = head_pieces(head_dim)
    args = (q, k, v, mask, out, out if codes is None else codes, out if scale is None else scale, queries,
            math.log2(math.e) / math.sqrt(head_dim), *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
            *out.stride()[:2])
    flags = dict(KEYS=keys, HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_L=max(16, triton.next_power_of_2(keys)),
                 D_MAIN=main, D_TAIL=tail, HAS_MASK=key_mask is not None,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", QUANT=fast is not None,
                 FAST=bool(fast), CHUNK=QUANT_CHUNK)
    kernels = _triton_module()
    if config is None and not interpret_mode():
        kernels.cross_attention_tuned[lambda meta: (batch, triton.cdiv(queries, meta["BLOCK_M"]))](*args, **flags)
    else:
        block_m, warps = config or DEFAULT_CONFIG
        kernels.cross_attention_kernel[(batch, triton.cdiv(queries, block_m))](*args, BLOCK_M=block_m,
                                                                                num_warps=warps, **flags)
    return out if fast is None else (codes, scale)


def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                           num_heads: int, config: tuple[int, int] | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference.
    config: (BLOCK_M, num_warps); None: autotuned over CONFIGS (the interpreter: DEFAULT_CONFIG)."""
    return _launch(q, k, v, key_mask, num_heads, config)


def cross_attention_fp8_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                               num_heads: int, fast: bool = False,
                               config: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel with the per-token e4m3 quantization of its output fused: (codes float8_e4m3fn [B·N, C],
    scale float32 [B·N, 1]), those of `quantize_fp8_per_token(out.reshape(-1, C), fast=fast)` for the `out` of
    `cross_attention_triton` (the same values, bit for bit). fast: the quantization's one reciprocal per row instead
    of a division per element (`qdiff.kernels.fp8_quant`). On an H100 at XL/2's shape this took 0.163 ms against
    0.115 ms for the kernel alone plus about 0.04 ms for the separate quantization kernel, and the W8A8 FP8 step 80.6
    against 80.1 ms (docs/benchmarks.md, session 15): STDiT uses it only when asked
    (`MultiHeadCrossAttention.fp8_output`)."""
    return _launch(q, k, v, key_mask, num_heads, config, fast=bool(fast))


def _triton_module():
    return load_triton_kernels("triton_cross_attention")


def triton_available(device: torch.device | str) -> bool:
    """True when the kernel can run on tensors of `device`: CUDA with an importable Triton, or any device under
    TRITON_INTERPRET=1."""
    return triton_usable("triton_cross_attention", device)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, num_heads: int,
                    backend: str = "auto") -> torch.Tensor:
    """softmax(q_h·k_hᵀ/√d)·v_h per head over the unmasked keys: q [B, N, C], k, v [B, L, C] (channel stride 1),
    key_mask [B, L] bool or None -> [B, N, C] contiguous.

    backend: 'auto' (the Triton kernel on CUDA or under TRITON_INTERPRET=1, else the reference), 'triton' or
    'torch' (the reference). With a gradient to compute the reference runs (differentiable)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    _check(q, k, v, key_mask, num_heads)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return cross_attention_reference(q, k, v, key_mask, num_heads)
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.cross_attention_op(q, k, v, key_mask, num_heads, backend)
    use_triton = backend == "triton" or (backend == "auto" and triton_available(q.device))
    return (cross_attention_triton if use_triton else cross_attention_reference)(q, k, v, key_mask, num_heads)


def cross_attention_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                                  num_heads: int, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of the fused form: the reference output, quantized per token to e4m3 by the torch reference
    (`quantize_fp8_per_token`; fast only matters to the kernel)."""
    out = cross_attention_reference(q, k, v, key_mask, num_heads)
    return quantize_fp8_per_token(out.reshape(-1, out.shape[-1]))


def cross_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                        num_heads: int, fast: bool = False, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_attention` with its output quantized per token to e4m3 for an FP8 linear (the attention's proj):
    (codes float8_e4m3fn [B·N, C], scale float32 [B·N, 1]); the output itself never reaches memory as a tensor of
    its own. Dispatch as `cross_attention` ('auto': `cross_attention_fp8_triton` on CUDA or under TRITON_INTERPRET=1,
    `cross_attention_fp8_reference` elsewhere; one custom op under torch.compile). Inference only: the codes carry
    no gradient."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    _check(q, k, v, key_mask, num_heads)
    if torch.compiler.is_compiling():
        return _ops.cross_attention_fp8_op(q, k, v, key_mask, num_heads, bool(fast), backend)
    use_triton = backend == "triton" or (backend == "auto" and triton_available(q.device))
    if use_triton:
        return cross_attention_fp8_triton(q, k, v, key_mask, num_heads, fast=fast)
    return cross_attention_fp8_reference(q, k, v, key_mask, num_heads, fast)
