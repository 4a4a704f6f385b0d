"""Merge sibling linears that read the same input into one layer with their output channels stacked.

    qkv = merge_linears([attn.q, attn.k, attn.v])      # one GEMM with N = N_q + N_k + N_v
    q, k, v = qkv(x).split([N_q, N_k, N_v], dim=-1)

The merged layer computes exactly what the siblings compute, column block by column block: the input goes through
one activation quantization (it depends only on the input and the shared input terms) and one GEMM with a wider N,
which on an H100 runs at a higher rate than three narrow ones (docs/benchmarks.md). Works for nn.Linear (float),
IntLinear and FP8Linear when everything that acts on the input is the same in every sibling: the activation grid,
the smoothing scale and rotation (equal values), and the static range. Layers with TQE post terms (rank_out > 0) or
per-frame factors are not merged (`merge_problem` says why): their low-rank terms would need a block-diagonal B_out.

For inference only: an export file holds the unmerged layers (`qdiff.lowbit.export_int_model` refuses a merged one).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from qdiff.lowbit.fp8_linear import FP8Linear
from qdiff.lowbit.int_linear import IntLinear

# buffers with one row per output channel, stacked along dim 0; every other persistent buffer must be equal
OUT_CHANNEL_BUFFERS = ("qweight", "w_scale", "w_zero", "bias")
# derived state, rebuilt after merging (IntLinear.prepare / FP8Linear.prepare or the first forward)
DERIVED = {"w_colsum": None, "weight_e4m3": None, "bias_bf16": None}
# constructor settings that must agree (besides the class)
SETTINGS = ("in_features", "w_bits", "a_bits", "w_symmetric", "a_symmetric", "act_mode", "container", "w_format",
            "backend", "num_frames", "compile_act_quant", "fuse_input", "fast_accum", "cache_weight")


def merge_problem(layers: list[nn.Module]) -> str | None:
    """Why `layers` cannot be merged, or None when they can."""
    if len(layers) < 2:
        return "fewer than two layers"
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers):
        return f"mixed layer types {sorted({type(layer).__name__ for layer in layers})}"
    if type(first) is nn.Linear:
        if len({(layer.in_features, layer.weight.dtype, layer.weight.device, layer.bias is None) for layer in layers}) > 1:
            return "nn.Linear layers differ in in_features, dtype, device or bias"
        return None
    if not isinstance(first, (IntLinear, FP8Linear)):
        return f"{type(first).__name__} is neither nn.Linear, IntLinear nor FP8Linear"
    for name in SETTINGS:
        values = {repr(getattr(layer, name, None)) for layer in layers}
        if len(values) > 1:
            return f"their {name} differ ({sorted(values)})"
    if any(layer.rank_out for layer in layers):
        return "TQE post terms (rank_out > 0) are not merged"
    for name, buffer in first.named_buffers(recurse=False):
        if name in OUT_CHANNEL_BUFFERS or name in DERIVED:
            continue
        others = [layer._buffers.get(name) for layer in layers[1:]]
        if buffer is None:
            if any(other is not None for other in others):
                return f"{name} is set on some layers only"
        elif any(other is None or not torch.equal(other, buffer) for other in others):
            return f"their {name} differ"
    return None


@torch.no_grad()
def merge_linears(layers: list[nn.Module]) -> nn.Module:
    """One layer whose output is torch.cat([layer(x) for layer in layers], dim=-1). Raises ValueError (with
    `merge_problem`'s reason) when the layers cannot be merged. The inputs are not modified."""
    problem = merge_problem(layers)
    if problem is not None:
        raise ValueError(f"cannot merge {len(layers)} linears: {problem}")
    first = layers[0]
    outs = [layer.out_features for layer in layers]
    if type(first) is nn.Linear:
        merged = nn.Linear(first.in_features, sum(outs), bias=first.bias is not None, device=first.weight.device,
                           dtype=first.weight.dtype)
        merged.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if first.bias is not None:
            merged.bias.copy_(torch.cat([layer.bias for layer in layers]))
    else:
        merged = copy.deepcopy(first)
        merged.out_features = sum(outs)
        for name in OUT_CHANNEL_BUFFERS:
            if first._buffers.get(name) is not None:
                merged._buffers[name] = torch.cat([layer._buffers[name] for layer in layers])
        for name, value in DERIVED.items():
            if name in merged._buffers:
                merged._buffers[name] = value
        if isinstance(merged, IntLinear):
            merged._static_values = None
            merged.input_memo = None  # one layer: nothing left to share
    merged.merged_out_features = tuple(outs)
    return merged
