"""qdiff.cuda_graphs: the wrapper is the module itself on the CPU and under autograd; on CUDA it replays a captured
graph that computes what the module computes, per input signature."""
import collections

import pytest
import torch
from torch import nn

from qdiff.cuda_graphs import CUDAGraphForward, _flatten, _unspec


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, t, y=None, *, scale=1.0):
        out = self.linear(x) * scale + t[:, None]
        return {"out": out, "pair": (out.sum(-1), y)}


def test_spec_round_trip_and_hashable():
    x, t = torch.randn(2, 8), torch.arange(2.0)
    pair = collections.namedtuple("Pair", "a b")
    tree = ((x, t, None), {"scale": 0.5, "mask": [t, 3], "pair": pair(t, 1)})
    tensors, spec = _flatten(tree)
    assert [id(a) for a in tensors] == [id(x), id(t), id(t), id(t)]
    hash(spec)
    rebuilt = _unspec(spec, iter(tensors))
    assert rebuilt[0][0] is x and rebuilt[1]["scale"] == 0.5 and rebuilt[1]["mask"][1] == 3
    assert isinstance(rebuilt[1]["pair"], pair) and rebuilt[1]["pair"].a is t
    other_shape = _flatten(((torch.randn(3, 8), t, None), {"scale": 0.5, "mask": [t, 3], "pair": pair(t, 1)}))[1]
    other_value = _flatten(((x, t, None), {"scale": 0.25, "mask": [t, 3], "pair": pair(t, 1)}))[1]
    assert spec != other_shape and spec != other_value and spec == _flatten(tree)[1]


def test_cpu_and_autograd_run_the_module_itself():
    torch.manual_seed(0)
    toy = Toy()
    step = CUDAGraphForward(toy)
    x, t = torch.randn(2, 8), torch.arange(2.0)
    with torch.no_grad():
        assert torch.equal(step(x, t, scale=2.0)["out"], toy(x, t, scale=2.0)["out"])
    out = step(x, t)["out"]  # grad enabled: eager, differentiable
    out.sum().backward()
    assert toy.linear.weight.grad is not None and not step._graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_replay_matches_eager_per_signature():
    torch.manual_seed(0)
    toy = Toy().cuda()
    step = CUDAGraphForward(toy)
    with torch.no_grad():
        for batch in (2, 2, 3, 2):
            x, t = torch.randn(batch, 8, device="cuda"), torch.randn(batch, device="cuda")
            got, want = step(x, t, scale=0.5), toy(x, t, scale=0.5)
            assert torch.allclose(got["out"], want["out"]) and got["pair"][1] is None
        assert len(step._graphs) == 2
        first = step(x, t, scale=0.5)["out"]
        step(torch.zeros_like(x), t, scale=0.5)
        assert torch.allclose(first, toy(x, t, scale=0.5)["out"])  # outputs are copies, not the static buffer
        toy.linear.weight.mul_(2)  # in-place parameter updates are seen by the replay
        assert torch.allclose(step(x, t, scale=0.5)["out"], toy(x, t, scale=0.5)["out"])
