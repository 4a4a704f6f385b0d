"""Triton kernels of the integer path vs their torch references: activation quantization and the int GEMM.

On a GPU machine the checks run compiled and autotuned. Without CUDA they run under Triton's CPU interpreter
(small shapes, explicit tile configs): the interpreter must be on before triton is imported, so
`test_kernels_under_interpreter` reruns this file in a child process with TRITON_INTERPRET=1, and the checks
themselves are skipped in the parent. The int32 results must be equal.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from qdiff.kernels.act_quant import (  # noqa: E402
    project_codes_reference,
    project_codes_triton,
    quantize_per_token_reference,
    quantize_per_token_triton,
)
from qdiff.kernels.int_gemm import int_gemm_reference, int_gemm_triton  # noqa: E402
from qdiff.lowbit.pack import pack_int4  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_LOWBIT_INTERPRETER_CHILD"
ON_GPU = torch.cuda.is_available()
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def test_kernels_under_interpreter():
    """CPU machines: run every check below under the interpreter in a fresh process."""
    if ON_GPU or IN_CHILD:
        pytest.skip("the checks run directly here")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), **{CHILD_FLAG: "1"})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= 30, output[-2000:]


def _numpy_scalar_shim(monkeypatch):
    """Triton 3.6's interpreter converts its 1-element scalar arrays with int(), which NumPy >= 2.4 refuses
    ('only 0-dimensional arrays ...') for a runtime loop bound; convert through the single element instead."""
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_patch_lang_tensor"):  # another Triton version: nothing to patch
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


@pytest.fixture(autouse=True)
def triton_mode(request):
    """Skip the checks in the CPU parent process; in the interpreter child, patch the NumPy incompatibility."""
    if request.node.name == "test_kernels_under_interpreter" or ON_GPU:
        yield
        return
    if not IN_CHILD:
        pytest.skip("runs in the interpreter child process (test_kernels_under_interpreter)")
    monkeypatch = pytest.MonkeyPatch()
    _numpy_scalar_shim(monkeypatch)
    yield
    monkeypatch.undo()


# small tiles under the interpreter; None = autotuned on a GPU
ACT_CONFIG = None if ON_GPU else (16, 32, 4)
# interpreter: a chunked two-pass tile (BLOCK_K < K) and a whole-row tile (BLOCK_K ≥ K, the row read once)
ACT_CONFIGS = [None] if ON_GPU else [(16, 32, 4), (8, 128, 4)]
GEMM_CONFIG = None if ON_GPU else (16, 16, 16, 1, 4)
ACT_SHAPES = [(1000, 1152), (77, 4608), (5, 72)] if ON_GPU else [(37, 72), (5, 33)]
GEMM_SHAPES = [(1000, 1152, 1152), (333, 4608, 1152), (77, 1152, 2304), (20, 96, 40)] if ON_GPU else [
    (37, 24, 72), (19, 40, 33), (16, 16, 32)]  # (M, N, K): ragged M, N and K, odd K, and an exact tile


def assert_codes_equal(kernel, reference):
    for name in ("codes", "scale", "zero", "rowsum"):
        assert torch.equal(getattr(kernel, name), getattr(reference, name)), name
    if reference.proj is None:
        assert kernel.proj is None
    else:
        torch.testing.assert_close(kernel.proj, reference.proj, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(8, False), (6, False), (4, False), (8, True)])
@pytest.mark.parametrize("config", ACT_CONFIGS)
def test_act_quant_matches_reference(shape, bits, symmetric, config):
    rows, cols = shape
    x = torch.randn(rows, cols, device=DEVICE) * torch.linspace(0.1, 6, cols, device=DEVICE)
    x[0] = 0  # all-zero token
    kwargs = dict(smooth_scale=torch.rand(cols, device=DEVICE) + 0.5, post_a=torch.randn(2, cols, device=DEVICE),
                  frame_factor=torch.rand(4, device=DEVICE) + 0.5)
    reference = quantize_per_token_reference(x, bits, symmetric, **kwargs)
    assert_codes_equal(quantize_per_token_triton(x, bits, symmetric, **kwargs, config=config), reference)
    plain = quantize_per_token_triton(x, bits, symmetric, config=config)
    assert_codes_equal(plain, quantize_per_token_reference(x, bits, symmetric))


@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("frames", [False, True])
def test_codes_projection_matches_reference(shape, frames):
    rows, cols = shape
    x = torch.randn(rows, cols, device=DEVICE) * 3
    post_a = torch.randn(2, cols, device=DEVICE)
    factor = torch.rand(4, device=DEVICE) + 0.5 if frames else None
    fused = quantize_per_token_reference(x, 6, post_a=post_a, frame_factor=factor)
    act = quantize_per_token_reference(x, 6)
    reference = project_codes_reference(act, post_a, factor)
    torch.testing.assert_close(reference, fused.proj, rtol=1e-5, atol=1e-4)  # same values as the fused pass
    config = None if ON_GPU else (16, 32, 4)
    torch.testing.assert_close(project_codes_triton(act, post_a, factor, config=config), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_act_quant_half_inputs(dtype, smooth):
    if dtype == torch.bfloat16 and smooth and not ON_GPU:
        pytest.skip("the interpreter emulates float32 -> bfloat16 by truncation (the GPU rounds to nearest even)")
    x = (torch.randn(29, 72, device=DEVICE) * 3).to(dtype)
    scale = torch.rand(72, device=DEVICE) + 0.5 if smooth else None
    assert_codes_equal(quantize_per_token_triton(x, 8, smooth_scale=scale, config=ACT_CONFIG),
                       quantize_per_token_reference(x, 8, smooth_scale=scale))


@pytest.mark.parametrize("config", ACT_CONFIGS)
def test_act_quant_static_and_ties(config):
    # Δ = 1, z = 3: x = k + 0.5 sits exactly on a rounding tie; torch.round goes to the even neighbour
    x = (torch.arange(-40, 40, device=DEVICE, dtype=torch.float32) + 0.5).reshape(2, 40)
    reference = quantize_per_token_reference(x, 6, static=(1.0, 3.0))
    kernel = quantize_per_token_triton(x, 6, static=(1.0, 3.0), config=config)
    assert_codes_equal(kernel, reference)
    q = reference.codes.float() + 32  # back to q in [0, 63]
    expected = torch.clamp(torch.round(x) + 3, 0, 63)
    assert torch.equal(q, expected)


def gemm_operands(rows, n_out, depth, w4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (rows, depth), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (n_out, depth), generator=gen, dtype=torch.int8) if w4 else \
        torch.randint(-128, 128, (n_out, depth), generator=gen, dtype=torch.int8)
    ops = dict(
        a=a, a_scale=torch.rand(rows, generator=gen) * 1e-2, a_zero=torch.randint(-128, 128, (rows,), generator=gen, dtype=torch.int32),
        a_rowsum=a.sum(1, dtype=torch.int32), w_scale=torch.rand(n_out, generator=gen) * 1e-2,
        w_zero=torch.randint(-8 if w4 else -128, 8 if w4 else 128, (n_out,), generator=gen, dtype=torch.int32),
        w_colsum=w.sum(1, dtype=torch.int32), bias=torch.randn(n_out, generator=gen),
        proj=torch.randn(rows, 1, generator=gen), post_b=torch.randn(n_out, 1, generator=gen),
    )
    ops = {k: v.to(DEVICE) for k, v in ops.items()}
    w = w.to(DEVICE)
    return ops, w, (pack_int4(w) if w4 else w)


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("w4", [False, True])
@pytest.mark.parametrize("zeros", ["both", "activation", "none"])
def test_int_gemm_int32_is_exact(shape, w4, zeros):
    rows, n_out, depth = shape
    ops, codes, stored = gemm_operands(rows, n_out, depth, w4)
    if zeros in ("activation", "none"):
        ops["w_zero"] = None
    if zeros == "none":
        ops["a_zero"] = None
    reference = int_gemm_reference(w=codes, out_int32=True, **ops)
    kernel = int_gemm_triton(w=stored, out_int32=True, k=depth if w4 else None, config=GEMM_CONFIG, **ops)
    assert kernel.dtype == torch.int32 and torch.equal(kernel, reference)


@pytest.mark.parametrize("w4", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int_gemm_epilogue(w4, out_dtype):
    rows, n_out, depth = GEMM_SHAPES[0]
    ops, codes, stored = gemm_operands(rows, n_out, depth, w4, seed=1)
    reference = int_gemm_reference(w=codes, out_dtype=out_dtype, **ops)
    kernel = int_gemm_triton(w=stored, out_dtype=out_dtype, k=depth if w4 else None, config=GEMM_CONFIG, **ops)
    assert kernel.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=tol, atol=tol)


def test_wrapper_checks():
    ops, codes, _ = gemm_operands(8, 16, 32, w4=False)
    with pytest.raises(TypeError, match="a: expected row-major int8"):
        int_gemm_triton(**{**ops, "a": ops["a"].float()}, w=codes)
    with pytest.raises(ValueError, match="int4x2 weights for K=32 need"):
        int_gemm_triton(**ops, w=codes, k=32)
    with pytest.raises(ValueError, match="w_scale: expected contiguous"):
        int_gemm_triton(**{**ops, "w_scale": ops["w_scale"][:3]}, w=codes)


@pytest.mark.parametrize("w_bits,a_bits,temporal", [(8, 8, False), (4, 6, True)])
def test_int_linear_triton_backend_matches_torch_backend(w_bits, a_bits, temporal):
    from torch import nn

    from qdiff.balancing import hadamard
    from qdiff.layers import QuantLinear
    from qdiff.lowbit import IntLinear
    from qdiff.quantizers import ActQuantConfig, TQEConfig, WeightQuantConfig

    frames = 4
    layer = QuantLinear.from_linear(nn.Linear(48, 40), WeightQuantConfig(bits=w_bits), ActQuantConfig(bits=a_bits),
                                    TQEConfig(rank=4, rank_out=1), num_frames=frames if temporal else None)
    layer.set_balance(torch.rand(48) + 0.5, hadamard(48) if temporal else None)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.01)
        layer.lora_b_out.normal_(0, 0.01)
        layer.effective_weight()
    layer.quant_weight = layer.quant_act = True
    x = torch.randn(5, frames, 48) if temporal else torch.randn(37, 48)
    x = x.to(DEVICE)
    layer.to(DEVICE)
    with torch.no_grad():
        fake = layer(x)
        torch_out = IntLinear.from_quant_linear(layer, backend="torch")(x)
        triton_out = IntLinear.from_quant_linear(layer, backend="triton")(x)
    torch.testing.assert_close(triton_out, torch_out, rtol=1e-5, atol=1e-5)
    assert float((triton_out - fake).norm() / fake.norm()) < 1e-5
