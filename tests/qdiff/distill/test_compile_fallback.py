"""`qdiff.distill.checkpointing.compiled(fallback=True)` (what `distill.compile: auto` uses): a graph that fails to
compile runs eagerly instead; without the fallback the compile error reaches the caller."""
import pytest
import torch
from torch import nn

from qdiff.distill.checkpointing import compiled


class BrokenBackend(Exception):
    pass


def broken_backend(graph_module, example_inputs):
    raise BrokenBackend("this backend cannot compile anything")


def test_fallback_runs_the_graph_eagerly():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    want = layer(x)
    with compiled([layer], fallback=True, backend=broken_backend):
        got = layer(x)
        got.sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert layer.weight.grad is not None
    torch._dynamo.reset()


def test_without_fallback_the_compile_error_is_raised():
    layer = nn.Linear(8, 8)
    with pytest.raises(Exception, match="cannot compile anything"), compiled([layer], backend=broken_backend):
        layer(torch.randn(4, 8))
    assert "forward" not in vars(layer)  # the eager forward is back
    torch._dynamo.reset()
