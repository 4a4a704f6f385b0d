"""Triton kernels of the integer path vs their torch references: activation quantization and the int GEMM.

On a GPU machine the checks run compiled and autotuned. Without CUDA they run under Triton's CPU interpreter
(small shapes, explicit tile configs): the interpreter must be on before triton is imported, so
`test_kernels_under_interpreter` reruns this file in a child process with TRITON_INTERPRET=1, and the checks
themselves are skipped in the parent. The int32 results must be equal.
"""
import os
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from qdiff.kernels.act_quant import (  # noqa: E402
    project_codes_reference,
    project_codes_triton,
    quantize_per_token_reference,
    quantize_per_token_triton,
)
from qdiff.kernels.fused_producers import GeluTanh, LayerNormModulate  # noqa: E402
from qdiff.kernels.int_gemm import int_gemm_reference, int_gemm_triton  # noqa: E402
from qdiff.lowbit.pack import pack_int4  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_LOWBIT_INTERPRETER_CHILD"
ON_GPU = torch.cuda.is_available()
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def test_kernels_under_interpreter(run_interpreter_child):
    """CPU machines: run every check below under the interpreter in a fresh process."""
    if ON_GPU or IN_CHILD:
        pytest.skip("the checks run directly here")
    run_interpreter_child(__file__, CHILD_FLAG, keyword=None, at_least=60)


@pytest.fixture(autouse=True)
def triton_mode(request):
    """Skip the checks in the CPU parent process; in the interpreter child, make the interpreter round as the GPU."""
    if request.node.name == "test_kernels_under_interpreter" or ON_GPU:
        return
    if not IN_CHILD:
        pytest.skip("runs in the interpreter child process (test_kernels_under_interpreter)")
    from bench.check_int_kernels import install_interpreter_shims

    install_interpreter_shims()


# small tiles under the interpreter; None = autotuned on a GPU
ACT_CONFIG = None if ON_GPU else (16, 32, 4)
# interpreter: a chunked two-pass tile (BLOCK_K < K) and a whole-row tile (BLOCK_K ≥ K, the row read once)
ACT_CONFIGS = [None] if ON_GPU else [(16, 32, 4), (8, 128, 4)]
GEMM_CONFIG = None if ON_GPU else (16, 16, 16, 1, 4)
ACT_SHAPES = [(1000, 1152), (77, 4608), (5, 72)] if ON_GPU else [(37, 72), (5, 33)]
GEMM_SHAPES = [(1000, 1152, 1152), (333, 4608, 1152), (77, 1152, 2304), (20, 96, 40)] if ON_GPU else [
    (37, 24, 72), (19, 40, 33), (16, 16, 32)]  # (M, N, K): ragged M, N and K, odd K, and an exact tile


def cpu_reference(x, bits, symmetric=False, producer=None, **kwargs):
    """The torch reference on the CPU (CUDA's torch divides by a Python scalar through its reciprocal)."""
    kwargs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if isinstance(producer, LayerNormModulate):
        producer = producer._replace(shift=producer.shift.cpu(), scale=producer.scale.cpu())
    return quantize_per_token_reference(x.cpu(), bits, symmetric, producer=producer, **kwargs)


def on_cpu(act):
    return type(act)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in act))


def assert_codes_equal(kernel, reference):
    kernel = on_cpu(kernel)
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
    reference = cpu_reference(x, bits, symmetric, **kwargs)
    assert_codes_equal(quantize_per_token_triton(x, bits, symmetric, **kwargs, config=config), reference)
    plain = quantize_per_token_triton(x, bits, symmetric, config=config)
    assert_codes_equal(plain, cpu_reference(x, bits, symmetric))


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
    x = (torch.randn(29, 72, device=DEVICE) * 3).to(dtype)
    scale = torch.rand(72, device=DEVICE) + 0.5 if smooth else None
    assert_codes_equal(quantize_per_token_triton(x, 8, smooth_scale=scale, config=ACT_CONFIG),
                       cpu_reference(x, 8, smooth_scale=scale))


@pytest.mark.parametrize("config", ACT_CONFIGS)
def test_act_quant_static_and_ties(config):
    # Δ = 1, z = 3: x = k + 0.5 sits exactly on a rounding tie; torch.round goes to the even neighbour
    x = (torch.arange(-40, 40, device=DEVICE, dtype=torch.float32) + 0.5).reshape(2, 40)
    reference = cpu_reference(x, 6, static=(1.0, 3.0))
    kernel = quantize_per_token_triton(x, 6, static=(1.0, 3.0), config=config)
    assert_codes_equal(kernel, reference)
    q = reference.codes.float() + 32  # back to q in [0, 63]
    expected = torch.clamp(torch.round(x.cpu()) + 3, 0, 63)
    assert torch.equal(q, expected)


def assert_codes_close(kernel, reference, max_fraction=5e-3):
    """A fused producer (LayerNorm moments, GELU) rounds differently from torch in the last bit now and then:
    a code may move by one step on a rare element; everything else matches."""
    kernel = on_cpu(kernel)
    diff = (kernel.codes.int() - reference.codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= max_fraction
    torch.testing.assert_close(kernel.scale, reference.scale, rtol=1e-5, atol=0)
    assert int((kernel.zero - reference.zero).abs().max()) <= 1
    assert ((kernel.rowsum - reference.rowsum).abs() <= diff.sum(1)).all()
    if reference.proj is not None:
        torch.testing.assert_close(kernel.proj, reference.proj, rtol=1e-3, atol=1e-3 * float(reference.proj.abs().max()))


def producers(rows, cols, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    batch = 2 if rows % 2 == 0 else 1
    shift, scale = torch.randn(batch, cols, generator=gen), torch.randn(batch, cols, generator=gen) * 0.3
    return {"layernorm_modulate": LayerNormModulate(shift.to(DEVICE, dtype), scale.to(DEVICE, dtype), rows // batch),
            "gelu_tanh": GeluTanh()}


@pytest.mark.parametrize("shape", [(1000, 1152), (77, 4608), (6, 72)] if ON_GPU else [(38, 72), (5, 33)])
@pytest.mark.parametrize("kind", ["layernorm_modulate", "gelu_tanh"])
@pytest.mark.parametrize("bits,symmetric,extras", [(8, False, "tqe3"), (6, False, "smooth"), (8, True, "static"),
                                                   (4, False, "none")])
@pytest.mark.parametrize("config", ACT_CONFIGS)
def test_fused_producer_matches_reference(shape, kind, bits, symmetric, extras, config):
    rows, cols = shape
    x = torch.randn(rows, cols, device=DEVICE) * torch.linspace(0.1, 6, cols, device=DEVICE) + 0.3
    kwargs = {"tqe3": dict(post_a=torch.randn(3, cols, device=DEVICE)),
              "smooth": dict(smooth_scale=torch.rand(cols, device=DEVICE) + 0.5, post_a=torch.randn(1, cols, device=DEVICE)),
              "static": dict(static=(0.05, 0.0)), "none": {}}[extras]
    producer = producers(rows, cols)[kind]
    reference = cpu_reference(x, bits, symmetric, **kwargs, producer=producer)
    kernel = quantize_per_token_triton(x, bits, symmetric, **kwargs, producer=producer, config=config)
    assert_codes_close(kernel, reference)
    if not ON_GPU:  # the interpreter's float32 math is numpy's: the same codes here
        assert torch.equal(kernel.codes, reference.codes)


@pytest.mark.parametrize("kind", ["layernorm_modulate", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_producer_half_inputs(kind, dtype):
    rows, cols = (512, 1152) if ON_GPU else (38, 72)
    x = (torch.randn(rows, cols, device=DEVICE) * 3).to(dtype)
    producer = producers(rows, cols, dtype)[kind]
    kernel = quantize_per_token_triton(x, 8, producer=producer, config=ACT_CONFIG)
    reference = cpu_reference(x, 8, producer=producer)
    assert_codes_close(kernel, reference)
    if not ON_GPU:  # every eager op's rounding to the half dtype is reproduced
        assert torch.equal(kernel.codes, reference.codes)


def test_fused_producer_checks():
    x = torch.randn(6, 8, device=DEVICE)
    producer = LayerNormModulate(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 8, device=DEVICE), 4)
    with pytest.raises(ValueError, match="2 samples x 4 rows"):
        quantize_per_token_triton(x, 8, producer=producer, config=ACT_CONFIG)
    with pytest.raises(ValueError, match="shift: expected"):
        quantize_per_token_triton(x, 8, producer=producer._replace(shift=torch.zeros(2, 7, device=DEVICE),
                                                                  rows_per_sample=3), config=ACT_CONFIG)


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
