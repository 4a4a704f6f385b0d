"""Effective weights for training, computed once per iteration (`distill.fused_weights`).

    with weights_once(student):          # every weight-quantized QuantLinear reads its W_eff from here
        loss = loss_fn(student(x)); loss.backward()

Without this, each QuantLinear call rebuilds W_eff = Q(W·s + B·A) + b_out·a_out from ~12 fp32 autograd
ops, and once more in the gradient-checkpoint recompute of its block. Here every layer's W_eff
[d_out, d_in] fp32 is formed once, before the forward, by `fake_quant_weight` (one fused Triton pass
on CUDA, the eager reference elsewhere), and its backward is the straight-through gradient written
out (`_FakeQuantWeightSTE`): the same operations autograd runs through `qdiff.quantizers.uniform
.fake_quant`, so on CPU the gradients of A, B, Δ, a_out, b_out are bit-identical to the per-call path
(when a layer runs several forwards per iteration, e.g. rows of several timesteps, its W_eff gradient is
summed before the chain instead of after: equal up to fp32 rounding).
B·A is computed in fp32 outside autocast, as `QuantLinear.effective_weight` does at inference (the
per-call path under CUDA autocast computes it in bf16).
Memory: W_eff fp32 of every layer (and weight width) for the iteration, 3 GB for STDiT-XL/2; nothing else
is saved (with a Hadamard rotation also W' = (W·s)·H).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qdiff.api import quant_layers
from qdiff.kernels.weight_quant import fake_quant_weight
from qdiff.layers.quant_linear import QuantLinear
from qdiff.quantizers.uniform import quant_range

__all__ = ["training_weight", "weights_once"]


class _FakeQuantWeightSTE(torch.autograd.Function):
    """W_eff = Q(W0·s + B·A) + b_out·a_out -> [d_out, d_in] fp32, with the STE backward of `fake_quant`.

    Inputs: W0 [d_out, d_in] (frozen), s [d_in] or None, B [d_out, r] / A [r, d_in] or None,
    Δ / z [d_out, G, 1] (G groups of input channels), b_out [d_out, 1] / a_out [1, d_in] or None.
    """

    @staticmethod
    def forward(ctx, weight, smooth, lora_b, lora_a, delta, zero_point, post_b, post_a, bits, symmetric):
        ctx.save_for_backward(weight, smooth, lora_b, lora_a, delta, zero_point, post_b, post_a)
        ctx.bits, ctx.symmetric = bits, symmetric
        low_rank = None if lora_a is None else _low_rank(lora_b, lora_a)
        post = None if post_b is None else (post_b, post_a)
        groups = delta.shape[1]
        return fake_quant_weight(weight, delta.reshape(-1, groups), zero_point.reshape(-1, groups), bits, symmetric,
                                 smooth=smooth, low_rank=low_rank, post=post, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        weight, smooth, lora_b, lora_a, delta, zero_point, post_b, post_a = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.float()
        q_min, q_max = quant_range(ctx.bits, ctx.symmetric)
        w = weight.float()  # recomputed as in the forward (nothing large was saved)
        if smooth is not None:
            w = w * smooth
        if lora_a is not None:
            w = w + _low_rank(lora_b, lora_a)
        d_out, groups = delta.shape[:2]
        w, g = w.reshape(d_out, groups, -1), grad.reshape(d_out, groups, -1)
        # autograd's chain, op for op: out = (clamp(round(u) + z) − z)·Δ with u = w/Δ
        u = w / delta
        v = u.round() if ctx.symmetric else u.round() + zero_point
        clamped = v.clamp(q_min, q_max)
        grad_u = torch.where((v >= q_min) & (v <= q_max), g * delta, 0.0)  # mul, then clamp backward
        grad_w = (grad_u / delta).reshape(d_out, -1)  # div backward (self)
        grad_delta = grad_b = grad_a = grad_post_b = grad_post_a = None
        if need[4]:
            scaled = clamped if ctx.symmetric else clamped - zero_point
            grad_delta = (g * scaled).sum(-1, keepdim=True) + (-grad_u * ((w / delta) / delta)).sum(-1, keepdim=True)
        if lora_a is not None:
            grad_b = grad_w.mm(lora_a.t()) if need[2] else None
            grad_a = lora_b.t().mm(grad_w) if need[3] else None
        if post_b is not None:
            grad_post_b = (grad * post_a).sum(1, keepdim=True) if need[6] else None
            grad_post_a = (grad * post_b).sum(0, keepdim=True) if need[7] else None
        return None, None, grad_b, grad_a, grad_delta, None, grad_post_b, grad_post_a, None, None


def _low_rank(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """B·A [d_out, d_in] in fp32, also under autocast."""
    with torch.autocast(lora_a.device.type, enabled=False):
        return lora_b @ lora_a


def training_weight(layer: QuantLinear, bits: int | None = None) -> torch.Tensor:
    """The layer's W_eff [d_out, d_in] fp32 at weight width `bits` (default: the width in use) for its
    current range, differentiable in its TQE terms and Δ.

    Equals `layer.effective_weight(bits=bits)` (bit for bit on CPU, and on CUDA outside autocast).
    """
    quantizer = layer._weight_quantizer_for(layer.w_bits if bits is None else bits)
    index = layer.range_index
    weight, smooth = layer.weight, layer._smooth_scale(index)
    if layer._rotation() is not None:  # W' = (W·s)·H is a GEMM: form it (frozen), then fuse the rest
        weight, smooth = layer.balanced_weight(index), None
    post_b = post_a = None
    if layer.lora_b_out is not None and layer.lora_b_out.shape[1] == 1:
        post_b, post_a = layer.lora_b_out, layer.lora_a_out
    w_eff = _FakeQuantWeightSTE.apply(
        weight, smooth, layer.lora_b, layer.lora_a, quantizer.delta[index], quantizer.zero_point[index],
        post_b, post_a, quantizer.cfg.bits, quantizer.cfg.symmetric)
    if layer.lora_b_out is not None and post_b is None:  # a post term of rank > 1: plain autograd
        w_eff = w_eff + layer.lora_b_out @ layer.lora_a_out
    return w_eff


@contextmanager
def weights_once(model: nn.Module):
    """For the duration, every weight-quantized QuantLinear of `model` uses W_eff computed on entry.

    One W_eff per weight width the layer has (per-timestep bits give several: forwards of rows at
    other steps within the iteration pick theirs). Covers forwards and their backward (checkpoint
    recomputes included): the weights are formed here, outside any checkpointed block. Layers with
    several timestep ranges, folded layers, layers with FP8 weights and layers whose quantizers are not
    initialised keep their own path. Recreate it after each optimizer step.
    """
    layers = [layer for _, layer in quant_layers(model)
              if layer.quant_weight and layer.weight_quantizer is not None and layer.folded_weight is None
              and layer.num_ranges == 1
              and all(layer._weight_quantizer_for(bits).is_initialized(0) and not layer._weight_quantizer_for(bits).fp8
                      for bits in layer.weight_bit_widths)]  # FP8 weights: their own (autograd) path
    for layer in layers:  # an instance attribute shadows the method
        layer.effective_weight = _fixed(layer, {bits: training_weight(layer, bits) for bits in layer.weight_bit_widths})
    try:
        yield
    finally:
        for layer in layers:
            del layer.effective_weight


def _fixed(layer: QuantLinear, weights: dict[int, torch.Tensor]):
    def effective_weight(range_index: int | None = None, out_dtype: torch.dtype = torch.float32,
                         bits: int | None = None) -> torch.Tensor:
        return weights[layer.w_bits if bits is None else bits].to(out_dtype)
    return effective_weight
