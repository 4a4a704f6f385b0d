"""Per-token FP8 (e4m3) activation quantization (`qdiff.kernels.fp8_quant.quantize_fp8_per_token`): the torch
reference runs the producer's eager ops, the smoothing division and the FP8 math; the dispatch keeps plain torch ops
by default and picks the reference on the CPU; the custom op passes `torch.library.opcheck` and is what torch.compile
records. The Triton kernel runs in a child process under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
before triton is imported; `install_interpreter_shims` makes the interpreter's float32 -> e4m3 cast round to nearest
even, as the GPU's does): exact mode equals the reference bit for bit without a producer and with LayerNorm +
modulate on half inputs (float32 LayerNorm: codes equal, scales within an ulp, torch's moments are summed in another
order; GELU: a code moves by one step now and then, torch's 0.5·x·(1 + tanh u) cancels for x < 0); fast mode stays
within one e4m3 step. On a GPU, `bench/check_int_kernels.py --only fp8` runs the compiled kernel."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qdiff.kernels.fp8_quant import (
    e4m3_steps,
    fp8_row_scale,
    quantize_fp8_per_token,
    quantize_fp8_per_token_reference,
    to_fp8,
)
from qdiff.kernels.fused_producers import GELU_TANH, GeluTanh, LayerNormModulate

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_FP8_ACT_QUANT_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"
parent_only = pytest.mark.skipif(IN_CHILD, reason="the parent process runs the CPU reference checks")
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs in the interpreter child (test_triton_kernel_in_child)")

# (ROWS, BLOCK_K, warps): a chunked two-pass tile, a whole-row tile (the row read once while K <= 256), and a
# 64-lane tile that reads K = 72 whole as 64 + a 16-lane tail (`tail_width`)
TILES = [(16, 32, 4), (8, 256, 4), (8, 64, 4)]
SHAPES = [(37, 72), (5, 64), (19, 200), (6, 1152)]  # ragged M; K = 1152 is chunked with both tiles


def activation(rows, cols, dtype, seed=0):
    """Channels of growing range, a zero row, a negative-zero entry and an outlier."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.linspace(0.1, 6, cols) + 0.2
    x[1 % rows] = 0.0
    x[-1, 0] = -0.0
    x[0, -1] = 40.0
    return x.to(dtype)


def producer(kind, rows, cols, dtype, seed=5):
    if kind == "none":
        return None
    if kind == "gelu":
        return GeluTanh()
    gen = torch.Generator().manual_seed(seed)
    batch = 2 if rows % 2 == 0 else 1
    return LayerNormModulate(torch.randn(batch, cols, generator=gen).to(dtype),
                             (torch.randn(batch, cols, generator=gen) * 0.3).to(dtype), rows // batch)


def assert_fp8_equal(got, expected):
    """Bit for bit, the sign of zero included."""
    (codes, scale), (ref_codes, ref_scale) = got, expected
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == ref_codes.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape == (codes.shape[0], 1)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)), "codes differ"
    assert torch.equal(scale, ref_scale), f"scales differ by {float((scale - ref_scale).abs().max()):.3g}"


def assert_fp8_close(got, expected, max_fraction=5e-3):
    """Scales within float32 rounding; codes at most one e4m3 step apart, on at most `max_fraction` of them."""
    (codes, scale), (ref_codes, ref_scale) = got, expected
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    steps = e4m3_steps(codes, ref_codes)
    moved = float((steps > 0).float().mean())
    assert int(steps.max()) <= 1 and moved <= max_fraction, (int(steps.max()), moved)


# ------------------------------------------------------------------------------------------ CPU (reference) checks
@parent_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_eager_ops(dtype):
    """producer.apply, then x / s in x's dtype, then the FP8 math of `fp8_row_scale` / `to_fp8`."""
    rows, cols = 12, 72
    x = activation(rows, cols, dtype)
    smooth = torch.rand(cols) + 0.5
    for kind in ("none", "layernorm_modulate", "gelu"):
        made = producer(kind, rows, cols, dtype)
        y = x if made is None else made.apply(x)
        y32 = (y / smooth.to(dtype)).float()
        expected = to_fp8(y32, fp8_row_scale(y32)), fp8_row_scale(y32)
        assert_fp8_equal(quantize_fp8_per_token_reference(x, smooth, made), expected)
    ln = producer("layernorm_modulate", rows, cols, dtype)
    eager = F.layer_norm(x, (cols,), eps=1e-6).reshape(2, -1, cols) * (1 + ln.scale[:, None]) + ln.shift[:, None]
    assert torch.equal(ln.apply(x), eager.reshape(rows, cols))
    codes, scale = quantize_fp8_per_token_reference(x)
    assert torch.equal(codes[1].float(), torch.zeros(cols))  # the zero row: scale 1e-12 / 448
    assert torch.equal(scale[1], torch.tensor([1e-12]) / 448)


@parent_only
def test_dispatch():
    x = activation(9, 64, torch.float32)
    expected = quantize_fp8_per_token_reference(x)
    for backend in ("torch", "auto"):  # the CPU: the reference either way
        assert_fp8_equal(quantize_fp8_per_token(x, backend=backend), expected)
    codes, scale = quantize_fp8_per_token(x.reshape(3, 3, 64))  # the default keeps today's [..., K] form
    assert codes.shape == (3, 3, 64) and scale.shape == (3, 3, 1)
    with pytest.raises(ValueError, match="backend"):
        quantize_fp8_per_token(x, backend="cuda")


@parent_only
def test_hardware_tanh_only_for_fast_kernels_on_nvidia_gpus(monkeypatch):
    from qdiff.kernels import fused_producers

    cuda = torch.device("cuda", 0)
    cached = fused_producers._runs_tanh_approx  # the device query is cached: cleared whenever the fake GPU changes
    cached.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    assert fused_producers.hardware_tanh(cuda, fast=True)
    assert not fused_producers.hardware_tanh(cuda, fast=False)  # exact mode keeps the exact formula
    assert not fused_producers.hardware_tanh(torch.device("cpu"), fast=True)  # the interpreter cannot run PTX
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    cached.cache_clear()
    assert not fused_producers.hardware_tanh(cuda, fast=True)  # tanh.approx.f32 needs sm_75
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cached.cache_clear()
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not fused_producers.hardware_tanh(cuda, fast=True)  # ROCm: no PTX
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(fused_producers, "HARDWARE_TANH", False)  # the benchmarks' switch
    assert not fused_producers.hardware_tanh(cuda, fast=True)
    cached.cache_clear()


def op_args(backend="auto", gen_seed=1):
    gen = torch.Generator().manual_seed(gen_seed)
    ln = producer("layernorm_modulate", 10, 16, torch.float32)
    return (torch.randn(10, 16, generator=gen), torch.rand(16, generator=gen) + 0.5, ln.kind, ln.shift, ln.scale,
            ln.rows_per_sample, ln.eps, backend, False)


@parent_only
def test_opcheck():
    torch.library.opcheck(torch.ops.qdiff.quantize_fp8_per_token.default, op_args())
    x = op_args()[0]
    torch.library.opcheck(torch.ops.qdiff.quantize_fp8_per_token.default,
                          (x.bfloat16(), None, GELU_TANH, None, None, 1, 0.0, "auto", True))


@parent_only
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_dispatch(backend, recorded_ops):
    """Under torch.compile "auto" is one opaque op; "torch" stays plain ops the compiler sees (and fuses)."""
    x, smooth, _, shift, scale, rows_per_sample, eps, _, _ = op_args()

    def quant(x, smooth, shift, scale):
        return quantize_fp8_per_token(x, smooth, LayerNormModulate(shift, scale, rows_per_sample, eps),
                                      backend=backend)

    eager, compiled, names = recorded_ops(quant, x, smooth, shift, scale)
    assert names == (["qdiff.quantize_fp8_per_token"] if backend == "auto" else [])
    assert_fp8_equal(compiled, eager)


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@parent_only
def test_triton_kernel_in_child(run_interpreter_child):
    """Runs the `interp` tests below in a child process under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("GPU machines run the kernel directly (bench/check_int_kernels.py --only fp8)")
    run_interpreter_child(__file__, CHILD_FLAG, passed=75)


def kernel(*args, **kwargs):
    from qdiff.kernels.fp8_quant import quantize_fp8_per_token_triton

    return quantize_fp8_per_token_triton(*args, **kwargs)


@child_only
def test_interp_cast_rounds_to_nearest_even(interpreter):
    """Every e4m3 value, the midpoints between neighbours (ties: to the even code) and the points just off them."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()].unique()
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids.nextafter(torch.tensor(-1e9)), mids.nextafter(torch.tensor(1e9))])
    x = x[x.abs() <= 448].reshape(-1, 1)  # one value per row: codes = e4m3(x / s) with s from |x|
    codes, scale = kernel(torch.cat([x, torch.full_like(x, 448.0)], 1), config=(16, 32, 4))  # s = 1
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(codes[:, :1].view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


@child_only
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interp_no_producer_is_exact(interpreter, tile, shape, dtype):
    x = activation(*shape, dtype)
    smooth = torch.rand(shape[1]) + 0.5
    for s in (None, smooth):
        assert_fp8_equal(kernel(x, s, config=tile), quantize_fp8_per_token_reference(x, s))
    fast = kernel(x, smooth, config=tile, fast=True)
    assert_fp8_close(fast, quantize_fp8_per_token_reference(x, smooth), max_fraction=2e-2)


@child_only
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("kind", ["layernorm_modulate", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_fused_producer(interpreter, tile, shape, kind, dtype):
    x = activation(*shape, dtype)
    made = producer(kind, *shape, dtype)
    for smooth in (None, torch.rand(shape[1]) + 0.5):
        got, expected = kernel(x, smooth, made, config=tile), quantize_fp8_per_token_reference(x, smooth, made)
        if kind == "layernorm_modulate" and dtype != torch.float32:
            assert_fp8_equal(got, expected)
        else:
            assert_fp8_close(got, expected)
        assert_fp8_close(kernel(x, smooth, made, config=tile, fast=True), expected, max_fraction=2e-2)


@child_only
def test_interp_half_layernorm_and_checks(interpreter):
    rows, cols = 38, 72
    x = activation(rows, cols, torch.float16)
    made = producer("layernorm_modulate", rows, cols, torch.float16)
    assert_fp8_equal(kernel(x, None, made, config=TILES[0]), quantize_fp8_per_token_reference(x, None, made))
    wide = activation(rows, 2 * cols, torch.float32)[:, ::2]  # a non-unit column stride: copied by the wrapper
    assert_fp8_equal(kernel(wide, config=TILES[0]), quantize_fp8_per_token_reference(wide))
    codes, scale = kernel(x[:0], config=TILES[0])
    assert codes.shape == (0, cols) and scale.shape == (0, 1)
    with pytest.raises(ValueError, match="smooth_scale"):
        kernel(x, torch.ones(cols + 1), config=TILES[0])
    with pytest.raises(ValueError, match="samples x"):
        kernel(x[:30], None, made, config=TILES[0])


@child_only
def test_interp_dispatch_and_compiled_op_run_the_kernel(interpreter, recorded_ops):
    x, smooth, _, shift, scale, rows_per_sample, eps, _, _ = op_args()

    def quant(x, smooth, shift, scale):
        return quantize_fp8_per_token(x, smooth, LayerNormModulate(shift, scale, rows_per_sample, eps),
                                      backend="triton")

    eager, compiled, names = recorded_ops(quant, x, smooth, shift, scale)
    assert names == ["qdiff.quantize_fp8_per_token"]
    assert_fp8_equal(compiled, eager)
    assert_fp8_close(eager, quantize_fp8_per_token_reference(x, smooth, LayerNormModulate(shift, scale,
                                                                                          rows_per_sample, eps)))
