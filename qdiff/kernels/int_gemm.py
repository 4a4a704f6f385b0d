"""Integer GEMM with the dequantizing epilogue of an asymmetric W·A linear layer.

Notation: activation codes X [M, K] int8 with per-row step s_x [M] and zero code z_x [M]; weight codes
W [N, K] (int8, or int4 packed two per byte, `qdiff.lowbit.pack`) with per-channel step s_w [N] and zero
code z_w [N]. The layer computes Σ_k s_x(X − z_x)·s_w(W − z_w), expanded so the tensor cores only see codes:
    acc[m, n] = Σ_k X[m, k]·W[n, k]                                   (int8 × int8 -> int32)
    acc      −= z_x[m]·colsum[n] + z_w[n]·rowsum[m] − K·z_x[m]·z_w[n]  (int32; colsum = Σ_k W[n, k],
                                                                        rowsum = Σ_k X[m, k])
    y[m, n]   = float(acc)·s_x[m]·s_w[n] + bias[n] + Σ_j proj[m, j]·post_b[n, j]    (float32 -> out dtype)
The int32 part is exact (no overflow while 255²·K < 2^31, i.e. K ≤ 33,000); `proj`·post_bᵀ is TQE's rank-r
post-quantizer term (proj from the activation quantizer). Symmetric sides drop their correction terms.
"""
from __future__ import annotations

import torch

from qdiff.kernels import ops as _ops  # the custom ops that torch.compile records (qdiff/kernels/ops.py)
from qdiff.kernels.act_quant import interpret_mode, load_triton_kernels, triton_available

MAX_K = 33_000  # 255² · K must stay below 2^31 for the int32 accumulator


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a·bᵀ of int8 a [M, K], int8 b [N, K] -> int32 [M, N] with plain torch ops (any device)."""
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b.to(torch.int32).t()
    rows, depth = a.shape
    if rows > 16 and depth % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a.contiguous(), b.t())
    # float64 holds every partial sum exactly (|Σ| < 2^53); CUDA has no int32 matmul
    return (a.double() @ b.double().t()).to(torch.int32)


def int_gemm_reference(
    a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor | None, a_rowsum: torch.Tensor | None,
    w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, w_colsum: torch.Tensor | None,
    bias: torch.Tensor | None = None, proj: torch.Tensor | None = None, post_b: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, out_int32: bool = False,
) -> torch.Tensor:
    """The pure-PyTorch definition (module docstring). w: unpacked int8 codes [N, K].

    a [M, K] int8, a_scale [M] f32, a_zero/a_rowsum [M] int32 or None (symmetric activations);
    w_scale [N] f32, w_zero/w_colsum [N] int32 or None (symmetric weights); bias [N]; proj [M, r] f32 and
    post_b [N, r] or None. Returns y [M, N] in out_dtype, or the corrected int32 accumulator if out_int32.
    """
    depth = a.shape[1]
    acc = int_matmul(a, w)
    if a_zero is not None:
        acc = acc - a_zero[:, None] * w_colsum[None, :]
    if w_zero is not None:
        acc = acc - a_rowsum[:, None] * w_zero[None, :]
    if a_zero is not None and w_zero is not None:
        acc = acc + depth * a_zero[:, None] * w_zero[None, :]
    if out_int32:
        return acc
    y = acc.float() * a_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    if proj is not None:
        for j in range(proj.shape[1]):
            y = y + proj[:, j, None] * post_b[:, j].float()[None, :]
    return y.to(out_dtype)


# ------------------------------------------------------------------------------------------ Triton
def _triton_module():
    return load_triton_kernels("triton_int_gemm")


def int_gemm_triton(
    a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor | None, a_rowsum: torch.Tensor | None,
    w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None, w_colsum: torch.Tensor | None,
    bias: torch.Tensor | None = None, proj: torch.Tensor | None = None, post_b: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, out_int32: bool = False, k: int | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """The Triton kernel; contract of `int_gemm_reference`, except that w is the stored container:
    int8 codes [N, K], or int4x2 bytes [N, ⌈K/2⌉] (uint8/int8) with `k` = K given.

    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) to skip autotuning (the interpreter needs one).
    Checks shapes, dtypes and contiguity and raises ValueError/TypeError naming the argument.
    """
    import triton

    rows, depth = a.shape
    if a.dtype != torch.int8 or a.stride(-1) != 1:
        raise TypeError(f"a: expected row-major int8 codes [M, K], got {a.dtype} strides {a.stride()}")
    if w.dim() != 2 or w.stride(-1) != 1 or w.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"w: expected row-major int8/uint8 [N, K or ceil(K/2)], got {w.dtype} {tuple(w.shape)}")
    w4 = k is not None
    n_out = w.shape[0]
    if w4:
        if k != depth or w.shape[1] != (depth + 1) // 2:
            raise ValueError(f"w: int4x2 weights for K={depth} need [N, {(depth + 1) // 2}] bytes and k={depth}, "
                             f"got {tuple(w.shape)}, k={k}")
        w = w.view(torch.int8)
    elif w.shape[1] != depth or w.dtype != torch.int8:
        raise ValueError(f"w: expected int8 [N, {depth}], got {w.dtype} {tuple(w.shape)}")
    if depth > MAX_K:
        raise ValueError(f"K={depth} exceeds {MAX_K}: the int32 accumulator could overflow")
    for name, tensor, size, dtype in (("a_scale", a_scale, rows, torch.float32), ("w_scale", w_scale, n_out, torch.float32),
                                      ("a_zero", a_zero, rows, torch.int32), ("a_rowsum", a_rowsum, rows, torch.int32),
                                      ("w_zero", w_zero, n_out, torch.int32), ("w_colsum", w_colsum, n_out, torch.int32)):
        if tensor is not None and (tensor.shape != (size,) or tensor.dtype != dtype or not tensor.is_contiguous()):
            raise ValueError(f"{name}: expected contiguous {dtype} [{size}], got {tensor.dtype} {tuple(tensor.shape)}")
    if a_zero is not None and w_colsum is None:
        raise ValueError("w_colsum: needed with an activation zero point")
    if w_zero is not None and a_rowsum is None:
        raise ValueError("a_rowsum: needed with a weight zero point")
    rank = 0 if proj is None else proj.shape[1]
    if rank:
        if proj.shape[0] != rows or post_b is None or post_b.shape != (n_out, rank):
            raise ValueError(f"proj/post_b: expected [{rows}, r] and [{n_out}, r], got {tuple(proj.shape)}, "
                             f"{None if post_b is None else tuple(post_b.shape)}")
        proj, post_b = proj.float().contiguous(), post_b.float().contiguous()
    if bias is not None:
        bias = bias.float().contiguous()
    out = torch.empty(rows, n_out, device=a.device, dtype=torch.int32 if out_int32 else out_dtype)
    if rows == 0:
        return out
    dummy = a_scale
    args = (a, w, out, a_scale, dummy if a_zero is None else a_zero, dummy if a_rowsum is None else a_rowsum,
            w_scale, dummy if w_zero is None else w_zero, dummy if w_colsum is None else w_colsum,
            dummy if bias is None else bias, dummy if proj is None else proj, dummy if post_b is None else post_b,
            rows, n_out, depth, w.shape[1], a.stride(0), w.stride(0), out.stride(0),
            min(triton.next_power_of_2(rows), 8192))  # M_BUCKET: autotune key, M rounded up
    flags = dict(A_ZERO=a_zero is not None, W_ZERO=w_zero is not None, HAS_BIAS=bias is not None, R_OUT=rank,
                 W4=w4, OUT_INT32=out_int32)
    kernels = _triton_module()

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    if config is None and not interpret_mode():
        kernels.int_gemm_tuned[grid](*args, **flags)
    else:
        bm, bn, bk, stages, warps = config or (16, 16, 32, 1, 4)
        even = kernels.even_k({"KW": w.shape[1], "BLOCK_K": bk, "W4": w4, "K": depth})
        kernels.int_gemm_kernel[grid](*args, **flags, EVEN_K=even, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                    num_stages=stages, num_warps=warps)
    return out


def int_gemm(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias=None, proj=None, post_b=None,
             out_dtype=torch.float32, k: int | None = None, w_codes: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Dispatch: Triton on CUDA (backend 'auto'/'triton'), else the reference on the unpacked codes.

    w is the stored container (int8 [N, K], or int4x2 bytes with `k` = K); `w_codes` (unpacked int8 [N, K])
    may be given to spare the reference path an unpack. Under torch.compile this is the custom op
    `torch.ops.qdiff.int_gemm` (`qdiff.kernels.ops`), which runs this same dispatch eagerly.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    if torch.compiler.is_compiling():  # one opaque op for dynamo: it never traces a Triton launcher
        return _ops.int_gemm_op(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, proj,
                                        post_b, out_dtype, k or 0, backend)
    if backend == "triton" or (backend == "auto" and a.is_cuda and triton_available(a.device)):
        return int_gemm_triton(a, a_scale, a_zero, a_rowsum, w, w_scale, w_zero, w_colsum, bias, proj, post_b,
                               out_dtype=out_dtype, k=k)
    if w_codes is None:
        from qdiff.lowbit.pack import unpack_int4

        w_codes = unpack_int4(w, k) if k is not None else w
    return int_gemm_reference(a, a_scale, a_zero, a_rowsum, w_codes, w_scale, w_zero, w_colsum, bias, proj, post_b,
                              out_dtype=out_dtype)
