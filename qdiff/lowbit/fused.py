"""Fused producers for IntLinear and FP8Linear inputs: the op that makes a linear's input (LayerNorm + adaLN
modulation, or GELU) runs inside the activation-quantization kernel, and the layers receive a `QuantizedInput`
instead of a tensor.

    x_s = quantize_layernorm_modulate(x, norm, shift, scale, attn.q, attn.k, attn.v)   # None: not fusable
    q = attn.q(x_s if x_s is not None else t2i_modulate(norm(x), shift, scale))

The readers of one activation are all IntLinear (integer codes, `qdiff.kernels.act_quant.quantize_per_token`) or all
FP8Linear (e4m3 codes, `qdiff.kernels.fp8_quant.quantize_fp8_per_token`). Readers with the same input signature
(IntLinear: bits, grid, static range; both: the same smoothing scale or none) share one kernel launch; for IntLinear
it also computes every reader's TQE projection (their A_out stacked: R_OUT = Σ r), FP8Linear forms its post term from
the shared codes itself. Under torch.compile only readers without a smoothing scale share (their signature holds no
tensor id, so the compiler can trace it); one with a smoothing scale gets a launch of its own, with x / s fused after
the producer. Readers with a rotation (x / s)·H, and IntLinear readers with per-frame TQE factors, are not fusable:
the helpers return None and the caller runs the eager ops. On CPU the torch references run the model's own eager
ops, so the model's output does not change; on CUDA the kernels repeat them in float32 with the same roundings to
the activation's dtype (docs/int_kernels.md, "Fused producers").
"""
from __future__ import annotations

import torch
from torch import nn

from qdiff.kernels.act_quant import quantize_per_token
from qdiff.kernels.fp8_quant import quantize_fp8_per_token
from qdiff.kernels.fused_producers import GeluTanh, LayerNormModulate
from qdiff.lowbit.fp8_linear import FP8Act, FP8Linear
from qdiff.lowbit.int_linear import IntLinear, QuantizedInput


def _fusable(layer: nn.Module, compiling: bool) -> bool:
    """One layer's part of `fusable`."""
    if not isinstance(layer, (IntLinear, FP8Linear)) or layer.rotation is not None:
        return False
    if isinstance(layer, IntLinear) and (layer.frame_scale is not None or (compiling and layer.act_static is not None)):
        return False
    return layer.compile_act_quant == "fused" if compiling else layer.fuse_input


def fusable(*layers: nn.Module) -> bool:
    """True when the layers are IntLinear, or FP8Linear, layers (one class, one backend) that can take a
    QuantizedInput from a fused producer.

    Eager: when the layers opted in (`set_fusion`). Under torch.compile: when their compile_act_quant is "fused"
    (IntLinear: and their range is dynamic; `qdiff.api.compile_model(int_act_quant="fused")`); otherwise the compiler
    fuses the producer and the plain-torch quantization itself, and each layer quantizes its own input.
    """
    compiling = torch.compiler.is_compiling()
    return (all(_fusable(layer, compiling) for layer in layers) and len({type(layer) for layer in layers}) == 1
            and len({layer.backend for layer in layers}) == 1)


def set_fusion(model: nn.Module, enabled: bool = True) -> None:
    """Let the IntLinear and FP8Linear layers of `model` take fused-producer inputs, or not (the default)."""
    for module in model.modules():
        if isinstance(module, (IntLinear, FP8Linear)):
            module.fuse_input = enabled


def quantize_for(x: torch.Tensor, producer: LayerNormModulate | GeluTanh, layers) -> QuantizedInput:
    """producer.apply(x) quantized per token for each of `layers` (fusable, see `fusable`): x [..., K]."""
    x2 = x.reshape(-1, x.shape[-1])
    compiling = torch.compiler.is_compiling()
    groups: dict[tuple, list] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, IntLinear):
            layer._prepare()
        # compiled: a smoothing scale's signature holds its id, which the compiler does not trace: a launch of its own
        key = (index,) if compiling and layer.smooth_scale is not None else layer.input_signature()
        groups.setdefault(key, []).append(layer)
    acts = {}
    for members in groups.values():
        lead = members[0]
        if isinstance(lead, FP8Linear):
            act = FP8Act(*quantize_fp8_per_token(x2, lead.smooth_scale, producer, backend=lead.act_quant_backend(),
                                                 fast=lead.fast_act_quant()))
            acts.update({layer: (act, None) for layer in members})
            continue
        posts = [layer.post_a for layer in members if layer.post_a is not None]
        act = quantize_per_token(x2, lead.a_bits, lead.a_symmetric, smooth_scale=lead.smooth_scale,
                                 static=lead._static_values, post_a=torch.cat(posts) if posts else None,
                                 producer=producer, backend=lead.backend, fast=lead.fast_act_quant())
        start = 0
        for layer in members:
            proj = None
            if layer.post_a is not None:
                proj = act.proj[:, start:start + layer.rank_out]
                start += layer.rank_out
            acts[layer] = (act, proj)
    return QuantizedInput(x.shape, x.dtype, acts)


def quantize_layernorm_modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                                *layers: nn.Module) -> QuantizedInput | None:
    """`t2i_modulate(norm(x), shift, scale)` quantized for `layers`, or None when they cannot take it.

    x [B, N, K]; norm: nn.LayerNorm over K without affine parameters; shift, scale [B or 1, 1, K] in x's dtype.
    """
    if not (fusable(*layers) and isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None
            and x.dim() == 3 and tuple(norm.normalized_shape) == (x.shape[-1],)
            and shift.dtype == x.dtype and scale.dtype == x.dtype):
        return None
    batch, tokens, width = x.shape
    producer = LayerNormModulate(shift.expand(batch, 1, width).reshape(batch, width),
                                 scale.expand(batch, 1, width).reshape(batch, width), tokens, norm.eps)
    return quantize_for(x, producer, layers)


def quantize_gelu(h: torch.Tensor, act: nn.Module, *layers: nn.Module) -> QuantizedInput | None:
    """`act(h)` quantized for `layers` when act is GELU with the tanh approximation, else None. h [..., K]."""
    if not (fusable(*layers) and isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return None
    return quantize_for(h, GeluTanh(), layers)
