"""Multi-head self-attention over short sequences (STDiT's temporal attention: T = 16 frames), straight from the
q, k, v linears' outputs.

    out[b, t, s, h·d + j] = Σ_u softmax_u(q_h[b, t, s]·k_h[b, u, s] / √d) · v_h[b, u, s, j]

with q_h = q[..., h·d:(h+1)·d] (d = C / heads).

Two layouts, attention always over dim 1:
- frame-major q, k, v [B, T, S, C] (C = heads·d): attention over the T frames independently at every position s
  -> out [B, T, S, C] contiguous. This is STDiT's token order, so the temporal branch needs no permute copies
  (`t2v.models.stdit.Attention.forward_frames`).
- q, k, v [B', N, C] -> out [B', N, C] contiguous: the S = 1 case.
Any batch, frame and position strides, channel stride 1 (so the three [.., C] slices of one [.., 3C] merged-qkv
output, or other views, need no copy); out in q's dtype. No [.., h, N, d] layout is formed.

- `short_attention_reference`: the definition in PyTorch (float32 math, the result cast to q's dtype).
- `short_attention_triton`: one Triton kernel (`qdiff.kernels.triton_short_attention`) that keeps each (b, s, head)
  problem in registers: float32 scores and softmax, float32 accumulation; bf16, fp16 or fp32 in and out; T ≤ 32.
- `short_attention`: the dispatch: Triton on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (Triton's
  interpreter, for tests); the reference elsewhere, and whenever autograd needs a gradient (the kernel is for
  inference). Under torch.compile it records the custom op `torch.ops.qdiff.short_attention` (`qdiff.kernels.ops`),
  one opaque call that CUDA graphs can capture.
"""
from __future__ import annotations

import math

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.act_quant import interpret_mode, load_triton_kernels, triton_usable

MAX_SEQ = 32  # longest sequence the kernel takes (its tiles hold the whole problem)
# (problems per program, num_warps) of the kernel: the default, and the candidates bench/bench_short_attention.py
# --configs times. On an H100 at XL/2's temporal shape (1, 1) was fastest: 0.104 ms vs 0.114 for (1, 4) and 0.183
# for (4, 8) (docs/benchmarks.md, session 11)
DEFAULT_CONFIG = (1, 1)
CONFIGS = ((1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 4), (4, 8))
BACKENDS = ("auto", "torch", "triton")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> tuple[int, int, int, int, int]:
    """(B, T, S, C, head_dim) of valid arguments (S = 1 for [B', N, C]); raises otherwise."""
    if q.dim() not in (3, 4) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"short_attention: expected q, k, v [B', N, C] or [B, T, S, C] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"short_attention: q, k, v must share one of float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    batch, seq, channels = q.shape[0], q.shape[1], q.shape[-1]
    spatial = q.shape[2] if q.dim() == 4 else 1
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"short_attention: C = {channels} is not divisible by num_heads = {num_heads}")
    return batch, seq, spatial, channels, channels // num_heads


def short_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The definition: q, k, v [B, T, S, C] (or [B', N, C]) -> like q, contiguous in q's dtype; attention over dim 1,
    per head in float32."""
    batch, seq, spatial, channels, head_dim = _check(q, k, v, num_heads)

    def heads(t):  # [B, T, S, C] -> [B, S, h, T, d] float32
        return t.float().reshape(batch, seq, spatial, num_heads, head_dim).permute(0, 2, 3, 1, 4)

    scores = heads(q) @ heads(k).transpose(-2, -1) * head_dim**-0.5  # [B, S, h, T, T]
    out = scores.softmax(dim=-1) @ heads(v)  # [B, S, h, T, d]
    return out.permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype).contiguous()


def short_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                           config: tuple[int, int] | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); same contract as the reference, for
    T ≤ MAX_SEQ. config: (problems per program, num_warps), default DEFAULT_CONFIG."""
    batch, seq, spatial, channels, head_dim = _check(q, k, v, num_heads)
    if seq > MAX_SEQ:
        raise ValueError(f"short_attention_triton: N = {seq} > {MAX_SEQ} (use SDPA for long sequences)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"short_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    import triton

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # [B', N, C] is [B', N, 1, C]: the unit axis's stride is never used
    q, k, v, o = (t if t.dim() == 4 else t.unsqueeze(2) for t in (q, k, v, out))  # [B, T, S, C]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    problems = batch * spatial * num_heads
    if problems == 0 or seq == 0:
        return out
    kernels = _triton_module()
    per_program, warps = config or DEFAULT_CONFIG
    kernels.short_attention_kernel[(triton.cdiv(problems, per_program),)](
        q, k, v, o, problems, math.log2(math.e) / math.sqrt(head_dim), *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *o.stride()[:3],
        SEQ=seq, SPATIAL=spatial, HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_N=max(16, triton.next_power_of_2(seq)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PROBLEMS=per_program,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps)
    return out


def _triton_module():
    return load_triton_kernels("triton_short_attention")


def triton_available(device: torch.device | str) -> bool:
    """True when the kernel can run on tensors of `device`: CUDA with an importable Triton, or any device under
    TRITON_INTERPRET=1."""
    return triton_usable("triton_short_attention", device)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    backend: str = "auto") -> torch.Tensor:
    """softmax(q_h·k_hᵀ/√d)·v_h per head over dim 1: q, k, v [B, T, S, C] or [B', N, C] (channel stride 1) ->
    like q, contiguous.

    backend: 'auto' (the Triton kernel on CUDA or under TRITON_INTERPRET=1 for T ≤ MAX_SEQ, else the reference),
    'triton' or 'torch' (the reference). With a gradient to compute the reference runs (differentiable)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    _, seq, *_ = _check(q, k, v, num_heads)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return short_attention_reference(q, k, v, num_heads)
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.short_attention_op(q, k, v, num_heads, backend)
    use_triton = backend == "triton" or (backend == "auto" and seq <= MAX_SEQ and triton_available(q.device))
    return (short_attention_triton if use_triton else short_attention_reference)(q, k, v, num_heads)
