"""Replay a module's inference forward as one CUDA graph: one launch per call instead of one per kernel.

A compiled integer DiT step launches thousands of small kernels (quantization, GEMMs, attention, norms); when the
host takes longer to queue them than the GPU takes to run them, the step is host-bound (docs/benchmarks.md,
session 9: 299 ms per W8A8 step against 152 ms of device time). A CUDA graph queues the whole forward at once.

    step = CUDAGraphForward(model)      # wraps; model stays usable on its own
    out = step(x, t, y, mask=mask)      # first call per input signature: warm-up + capture; then replays

Rules of a captured forward (as for any CUDA graph): no host synchronisation inside (no `.item()`, no data-dependent
shapes), the same input shapes, dtypes and non-tensor arguments per graph (a new signature captures a new graph),
and parameters that stay where they are (in-place updates are seen; replacing a tensor is not). The inputs are
copied into the graph's static buffers on every call, and the output is cloned out, so callers never see a buffer
that the next replay overwrites. Gradients are not supported: under autograd, or on the CPU, the module runs as is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static input buffers, in the flattened order of the call's tensors
    output: object  # the static output (a tensor or a nested structure of tensors)


class CUDAGraphForward(nn.Module):
    """`module`'s forward, captured once per input signature and replayed (inference on CUDA only).

    warmup: eager calls on a side stream before capture (compilation and Triton autotuning happen there, never
    inside the capture). max_graphs: signatures kept; one more raises, since each graph holds its own memory pool.
    """

    def __init__(self, module: nn.Module, warmup: int = 2, max_graphs: int = 8):
        super().__init__()
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Graph] = {}

    def forward(self, *args, **kwargs):
        tensors, key = _flatten((args, kwargs))  # key: the structure with shapes, dtypes, devices and values
        if torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors):
            return self.module(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(f"CUDAGraphForward: more than {self.max_graphs} input signatures; each captures "
                                   "a graph with its own memory: pad inputs to fixed shapes or raise max_graphs")
            entry = self._graphs[key] = self._capture(tensors, key)
        for static, value in zip(entry.inputs, tensors):
            static.copy_(value)
        entry.graph.replay()
        return _map(entry.output, torch.Tensor.clone)

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool), e.g. after replacing parameters."""
        self._graphs.clear()

    def _capture(self, tensors: list[torch.Tensor], spec) -> _Graph:
        static = [t.clone() for t in tensors]
        args, kwargs = _unspec(spec, iter(static))
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.module(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = self.module(*args, **kwargs)
        except RuntimeError as exc:
            raise RuntimeError(f"CUDAGraphForward: the forward of {type(self.module).__name__} cannot be captured "
                               f"as a CUDA graph (a host synchronisation or a CPU tensor inside?): {exc}") from exc
        return _Graph(graph, static, output)


def _flatten(tree) -> tuple[list[torch.Tensor], tuple]:
    """The tensors of a nested args structure, and its spec: a hashable description (tensors by shape, dtype and
    device; other values as they are) that `_unspec` rebuilds the structure from, given replacement tensors."""
    tensors: list[torch.Tensor] = []
    return tensors, _spec(tree, tensors)


def _spec(node, tensors):
    if isinstance(node, torch.Tensor):
        tensors.append(node)
        return ("tensor", tuple(node.shape), node.dtype, node.device)
    if isinstance(node, (list, tuple)):
        return (type(node), tuple(_spec(item, tensors) for item in node))
    if isinstance(node, dict):
        return (dict, tuple((key, _spec(value, tensors)) for key, value in node.items()))
    return ("value", node)


def _unspec(spec, values):
    kind = spec[0]
    if kind == "tensor":
        return next(values)
    if kind == "value":
        return spec[1]
    if kind is dict:
        return {key: _unspec(item, values) for key, item in spec[1]}
    return _sequence(kind, [_unspec(item, values) for item in spec[1]])


def _sequence(kind, items: list):
    """A list, tuple or namedtuple of `kind` holding `items`."""
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def _map(node, fn):
    if isinstance(node, torch.Tensor):
        return fn(node)
    if isinstance(node, (list, tuple)):
        return _sequence(type(node), [_map(item, fn) for item in node])
    if isinstance(node, dict):
        return {key: _map(value, fn) for key, value in node.items()}
    return node
