"""The compiled path's per-token activation quantizer (`quantize_per_token_torch`, plain torch ops) against the
references: codes, Δ, z and row sums equal `quantize_per_token_reference`; the dequantized codes equal the fake
quantizers (`DynamicActQuantizer`, `fake_quant_per_token_reference`) bit for bit; and the same holds after inductor
compiles it (CPU, the smallest shapes)."""
import pytest
import torch

from qdiff.kernels.act_quant import quantize_per_token_reference, quantize_per_token_torch
from qdiff.kernels.fake_quant import fake_quant_per_token_reference
from qdiff.quantizers.config import ActQuantConfig
from qdiff.quantizers.uniform import DynamicActQuantizer, StaticActQuantizer

GRIDS = [(8, False), (6, False), (8, True), (6, True), (4, False)]


def activations(rows=37, cols=96, dtype=torch.float32, seed=0):
    """Rows of varied range and offset, an all-zero row, an all-positive row and an all-negative row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 5
    x = x + torch.randn(rows, 1, generator=gen)
    x[3] = 0
    x[4] = x[4].abs() + 0.1
    x[5] = -x[5].abs() - 0.1
    return x.to(dtype)


def dequantized(act):
    return (act.codes.float() - act.zero.float()[:, None]) * act.scale[:, None]


def assert_codes_equal(act, ref, rowsum=True):
    assert act.codes.dtype == torch.int8 and act.zero.dtype == torch.int32 and act.scale.dtype == torch.float32
    assert torch.equal(act.codes, ref.codes)
    assert torch.equal(act.scale, ref.scale)
    assert torch.equal(act.zero, ref.zero)
    if rowsum:
        assert torch.equal(act.rowsum, ref.rowsum)


@pytest.mark.parametrize("bits,symmetric", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_reference(bits, symmetric, dtype):
    x = activations(dtype=dtype)
    smooth = torch.rand(x.shape[1]) + 0.5
    for kwargs in ({}, {"smooth_scale": smooth}):
        assert_codes_equal(quantize_per_token_torch(x, bits, symmetric, **kwargs),
                           quantize_per_token_reference(x, bits, symmetric, **kwargs))


@pytest.mark.parametrize("bits,symmetric", GRIDS[:4])
def test_dequantized_equals_fake_quantizers(bits, symmetric):
    """x̂ = (c − z_c)·Δ is DynamicActQuantizer's output (float32), 6- and 8-bit, both grids."""
    x = activations()
    fake = DynamicActQuantizer(ActQuantConfig(bits=bits, symmetric=symmetric))(x)
    assert torch.equal(dequantized(quantize_per_token_torch(x, bits, symmetric)), fake)
    if not symmetric:  # the fused kernels' definition: float32 math on a bf16 input, x̂ rounded to bf16
        half = activations(dtype=torch.bfloat16, seed=1)
        act = quantize_per_token_torch(half, bits, symmetric)
        assert torch.equal(dequantized(act).to(torch.bfloat16), fake_quant_per_token_reference(half, bits))


@pytest.mark.parametrize("symmetric", [False, True])
def test_static_range(symmetric):
    """A static per-tensor range, as floats or as IntLinear's act_static tensor, equals StaticActQuantizer."""
    x = activations()
    quantizer = StaticActQuantizer(ActQuantConfig(bits=8, symmetric=symmetric, mode="static_per_tensor"))
    quantizer.observing = True
    quantizer(x * 0.8)
    quantizer.observing = False
    from qdiff.lowbit.int_linear import _static_range

    delta, zero = _static_range(quantizer)
    ref = quantize_per_token_reference(x, 8, symmetric, static=(delta, zero))
    for static in ((delta, zero), torch.tensor([delta, zero])):
        act = quantize_per_token_torch(x, 8, symmetric, static=static)
        assert_codes_equal(act, ref)
        assert torch.equal(dequantized(act), quantizer(x))


@pytest.mark.parametrize("rank", [1, 3])
def test_tqe_projection_and_frames(rank):
    x = activations(rows=40)
    post_a = torch.randn(rank, x.shape[1])
    frames = torch.rand(5) + 0.5  # T = 5: row m -> frame m mod 5
    ref = quantize_per_token_reference(x, 8, post_a=post_a, frame_factor=frames)
    act = quantize_per_token_torch(x, 8, post_a=post_a, frame_factor=frames)
    assert_codes_equal(act, ref)
    torch.testing.assert_close(act.proj, ref.proj, rtol=1e-5, atol=1e-5)  # summation order only
    no_sums = quantize_per_token_torch(x, 8, rowsum=False)
    assert torch.equal(no_sums.codes, ref.codes) and not no_sums.rowsum.any()


def test_inductor_compiled_equals_reference():
    """Inductor's generated code (CPU) keeps the reference's math: codes, Δ, z and row sums equal."""
    torch._dynamo.reset()
    x = activations(rows=19, cols=40)
    static = torch.tensor([0.03, 128.0])

    def quantize_all(x):
        out = [quantize_per_token_torch(x, bits, symmetric) for bits, symmetric in GRIDS[:4]]
        return out + [quantize_per_token_torch(x, 8, static=static)]

    compiled = torch.compile(quantize_all, fullgraph=True, dynamic=False, backend="inductor")
    cases = [(*grid, None) for grid in GRIDS[:4]] + [(8, False, (0.03, 128.0))]
    for act, (bits, symmetric, static_range) in zip(compiled(x), cases):
        assert_codes_equal(act, quantize_per_token_reference(x, bits, symmetric, static=static_range))
    torch._dynamo.reset()
