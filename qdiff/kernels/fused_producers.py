"""Producers that the activation quantization kernel can fuse: it computes the op that makes the activation, then
quantizes it per token in the same pass, so the activation itself never goes through memory.

In front of the producer the kernels may also run a residual step (`Residual`): s = x + gate·y, written out as the
new residual stream, then produced from and quantized (the block's `x = x + gate·branch` followed by the next
linears' input, one pass instead of an add kernel and a quantization pass). With a per-frame table the quantized
input is u = s + table[frame] (the temporal attention's `x + temporal_pos_embed`), while s stays the stream.

Each producer is a small description with its PyTorch reference (`apply`), which runs the model's own eager ops;
`qdiff.kernels.act_quant.quantize_per_token(x, ..., producer=p)` quantizes p.apply(x). The Triton kernel repeats the
eager ops' float32 math and their rounding to x's dtype after each op (bf16 models round after every op).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

NONE, LAYERNORM_MODULATE, GELU_TANH = 0, 1, 2  # the kernel's PRODUCER constexpr
NO_RESIDUAL, RESIDUAL_ADD, RESIDUAL_GATED_ADD = 0, 1, 2  # the kernel's RESIDUAL constexpr


class Residual(NamedTuple):
    """The residual step in front of the producer: s = x + gate·y (gate None: x + y), each op rounded to x's dtype
    as the eager ops round it (`gate * y`, then the sum; no fma). s is the new residual stream; the producer reads
    u = s + table[frame(m)] (rounded to x's dtype, as the eager add), or s itself without a table.

    y: [M, K] in x's dtype, the same rows as x; gate: [B, K] in x's dtype or None; row m of x belongs to sample
    m // rows_per_sample. table: [T, K] in x's dtype or None; row m belongs to frame (m // rows_per_frame) % T
    (frame-major rows [B, T, rows_per_frame, K]; M a multiple of T·rows_per_frame).
    """

    y: torch.Tensor
    gate: torch.Tensor | None = None
    rows_per_sample: int = 1
    table: torch.Tensor | None = None
    rows_per_frame: int = 1

    @property
    def kind(self) -> int:
        return RESIDUAL_ADD if self.gate is None else RESIDUAL_GATED_ADD

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> s [M, K] in x's dtype, with the eager ops of `x + gate * y` (the block's [B, N, K] form)."""
        if self.gate is None:
            return x + self.y
        batch, width = self.gate.shape
        return (x.reshape(batch, -1, width) + self.gate[:, None] * self.y.reshape(batch, -1, width)).reshape(x.shape)

    def add_table(self, s: torch.Tensor) -> torch.Tensor:
        """s [M, K] -> the producer's input u [M, K]: s + table[frame(m)] with the eager op of the block's
        `x [B, T, S, K] + temporal_pos_embed[:, :, None]`; s itself without a table."""
        if self.table is None:
            return s
        frames, width = self.table.shape
        return (s.reshape(-1, frames, self.rows_per_frame, width) + self.table[:, None]).reshape(s.shape)


class LayerNormModulate(NamedTuple):
    """LayerNorm over K without affine, then adaLN modulation `y·(1 + scale) + shift` (t2i_modulate).

    shift, scale: [B, K] in x's dtype; row m of x [M, K] belongs to sample m // rows_per_sample.
    """

    shift: torch.Tensor
    scale: torch.Tensor
    rows_per_sample: int
    eps: float = 1e-6

    kind = LAYERNORM_MODULATE

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, K] in x's dtype, with the eager ops of `t2i_modulate(LayerNorm(x), shift, scale)`."""
        batch, width = self.shift.shape
        y = F.layer_norm(x, (width,), eps=self.eps).reshape(batch, -1, width)
        return (y * (1 + self.scale[:, None]) + self.shift[:, None]).reshape(x.shape)


class GeluTanh(NamedTuple):
    """GELU with the tanh approximation (`nn.GELU(approximate="tanh")`)."""

    kind = GELU_TANH

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, K] in x's dtype."""
        return F.gelu(x, approximate="tanh")


# `fast` kernels compute GELU's tanh with the GPU's one-instruction `tanh.approx.f32` (NVIDIA, sm_75+) where it runs;
# False keeps the exact formula v / (1 + exp(−2u)) in fast mode too (read at each launch: a switch for benchmarks)
HARDWARE_TANH = True


def hardware_tanh(device: torch.device, fast: bool) -> bool:
    """Whether a fast kernel on `device` computes GELU's tanh with `tanh.approx.f32`: CUDA (not ROCm, not the CPU
    interpreter) on sm_75 or newer, and `HARDWARE_TANH` on. Called at every launch: the device query is cached."""
    return (bool(fast) and HARDWARE_TANH and device.type == "cuda" and torch.version.hip is None
            and _runs_tanh_approx(device.index))


@functools.lru_cache(maxsize=None)
def _runs_tanh_approx(index: int | None) -> bool:
    """Whether CUDA device `index` (None: the current one) is sm_75 or newer."""
    return torch.cuda.get_device_capability(index) >= (7, 5)


def producer_args(producer: LayerNormModulate | GeluTanh | None) -> tuple:
    """The custom ops' flat form of a producer: (kind, shift, scale, rows_per_sample, eps); tensors None unless
    LayerNorm + modulate."""
    if isinstance(producer, LayerNormModulate):
        return producer.kind, producer.shift, producer.scale, producer.rows_per_sample, float(producer.eps)
    return (NONE if producer is None else producer.kind), None, None, 1, 0.0


def make_producer(kind: int, shift, scale, rows_per_sample: int, eps: float) -> LayerNormModulate | GeluTanh | None:
    """The producer of `producer_args`' flat form."""
    if kind == LAYERNORM_MODULATE:
        return LayerNormModulate(shift, scale, rows_per_sample, eps)
    return GeluTanh() if kind == GELU_TANH else None
