"""The inference kernels as torch.library custom ops (`qdiff.kernels.ops`): schemas, fake (meta) implementations
and autograd registration pass `torch.library.opcheck`; under torch.compile the dispatch functions record one opaque
op each (no graph break, no tracing into a Triton launcher) and compute what they compute eagerly; eager calls stay
off the ops. The Triton implementations behind the ops run in a child process under Triton's CPU interpreter."""
import os
from pathlib import Path

import pytest
import torch

from qdiff.kernels import ops
from qdiff.kernels.act_quant import project_codes, quantize_per_token, quantize_per_token_reference
from qdiff.kernels.fake_quant import fake_quant_per_token
from qdiff.kernels.fused_producers import LayerNormModulate
from qdiff.kernels.int_gemm import int_gemm
from qdiff.kernels.weight_quant import fake_quant_weight
from qdiff.lowbit.pack import pack_int4

REPO = Path(__file__).resolve().parents[3]
CHILD_FLAG = "QDIFF_CUSTOM_OPS_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"


def gemm_args(backend="torch", rows=10, depth=16, n_out=12):
    gen = torch.Generator().manual_seed(0)
    act = quantize_per_token_reference(torch.randn(rows, depth, generator=gen), 8)
    w = torch.randint(-8, 8, (n_out, depth), dtype=torch.int8, generator=gen)
    return (act.codes, act.scale, act.zero, act.rowsum, pack_int4(w), torch.rand(n_out, generator=gen),
            torch.randint(-8, 8, (n_out,), dtype=torch.int32, generator=gen), w.sum(1, dtype=torch.int32),
            torch.randn(n_out, generator=gen), torch.randn(rows, 1, generator=gen),
            torch.randn(n_out, 1, generator=gen),
            torch.bfloat16, depth, backend)


def op_cases(backend="torch"):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, generator=gen)
    act = quantize_per_token_reference(x, 8)
    ln = LayerNormModulate(torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen), 5)
    return {
        "int_gemm": gemm_args(backend),
        "quantize_per_token": (x, 6, False, torch.rand(16, generator=gen) + 0.5, ops.NO_STATIC, 0.0,
                               torch.randn(2, 16, generator=gen), torch.rand(5, generator=gen), ln.kind, ln.shift,
                               ln.scale, ln.rows_per_sample, ln.eps, backend, False),
        "project_codes": (act.codes, act.scale, act.zero, torch.randn(1, 16, generator=gen),
                          torch.rand(5, generator=gen), backend),
        "fake_quant_per_token": (x.bfloat16(), 8),
        "fake_quant_weight": (torch.randn(12, 16, generator=gen), torch.rand(12, 1, generator=gen) * 0.1,
                              torch.randint(0, 15, (12, 1), generator=gen).float(), 4, False,
                              torch.rand(16, generator=gen) + 0.5, torch.randn(12, 16, generator=gen) * 0.01, None,
                              torch.randn(12, 1, generator=gen), torch.randn(1, 16, generator=gen), torch.bfloat16),
    }


@pytest.mark.skipif(IN_CHILD, reason="the parent process checks the schemas")
@pytest.mark.parametrize("name", sorted(op_cases()))
def test_opcheck(name):
    """Schema, fake tensor, autograd registration and AOT dispatch checks of every op (CPU implementations)."""
    torch.library.opcheck(getattr(torch.ops.qdiff, name).default, op_cases()[name])


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (a - b).abs().max()
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert (u is None and v is None) or assert_same(u, v) is None


def dispatch_cases(backend):
    """(expected op, fn, args) of every dispatch function, with the op's arguments of `op_cases`."""
    cases = op_cases(backend)
    g = cases["int_gemm"]
    q = cases["quantize_per_token"]
    p = cases["project_codes"]
    w = cases["fake_quant_weight"]
    act = quantize_per_token_reference(torch.randn(10, 16), 8)

    def gemm(*a):
        return int_gemm(*a[:8], bias=a[8], proj=a[9], post_b=a[10], out_dtype=a[11], k=a[12], backend=a[13])

    def quant(x, shift, scale, smooth, post_a, frames):
        return quantize_per_token(x, 6, smooth_scale=smooth, post_a=post_a, frame_factor=frames,
                                  producer=LayerNormModulate(shift, scale, 5), backend=backend)

    def quant_static(x):
        return quantize_per_token(x, 8, True, static=(0.05, 0.0), backend=backend)

    def proj(codes, scale, zero, post_a, frames):
        from qdiff.kernels.act_quant import ActCodes

        return project_codes(ActCodes(codes, scale, zero, zero, None), post_a, frames, backend=backend)

    def weight(*a):
        return fake_quant_weight(*a[:5], smooth=a[5], low_rank=a[6], post=(a[8], a[9]), out_dtype=torch.bfloat16)

    return [
        ("qdiff.int_gemm", gemm, g),
        ("qdiff.quantize_per_token", quant, (q[0], q[9], q[10], q[3], q[6], q[7])),
        ("qdiff.quantize_per_token", quant_static, (act.codes.float(),)),
        ("qdiff.project_codes", proj, p[:5]),
        ("qdiff.fake_quant_per_token", fake_quant_per_token, cases["fake_quant_per_token"]),
        ("qdiff.fake_quant_weight", weight, w),
    ]


@pytest.mark.skipif(IN_CHILD, reason="the child runs the Triton variant")
@pytest.mark.parametrize("index", range(6))
def test_dispatch_records_one_op_under_compile(index, recorded_ops):
    expected, fn, args = dispatch_cases("torch")[index]
    eager, compiled, names = recorded_ops(fn, *args)
    assert names == [expected]
    assert_same(eager, compiled)


def test_triton_implementations_under_interpreter(run_interpreter_child, recorded_ops):
    """The ops with backend='triton' (the GPU kernels, here under the interpreter) compile and equal eager calls."""
    if not IN_CHILD:
        if torch.cuda.is_available():
            pytest.skip("GPU machines run the kernels directly (bench/check_int_kernels.py)")
        run_interpreter_child(__file__, CHILD_FLAG, keyword="test_triton_implementations_under_interpreter", passed=1)
        return
    from bench.check_int_kernels import install_interpreter_shims

    install_interpreter_shims()
    for expected, fn, args in dispatch_cases("triton")[:4]:  # the integer path's kernels
        eager, compiled, names = recorded_ops(fn, *args)
        assert names == [expected]
        assert_same(eager, compiled)
