"""STDiT (OpenSora v1.0) with every self-attention ``qkv`` split into ``q``, ``k``, ``v`` linears.

Notation: B batch, C hidden size, T frames, S = H'·W' spatial tokens per frame (T-major token order:
frame, then row, then column), L text tokens, C_cap caption channels, heads × head_dim = C.
Architecture and reference quirks: docs/METHOD.md section 1. The state dict equals the ``split``
layout of ``fixtures/opensora_v1/stdit_xl2_keys.json``; converting a released (merged-qkv)
checkpoint is ``t2v.models.checkpoint``'s job.

Every linear is an ``nn.Linear`` child called as a module (``self.q(x)``), so a quantization
library can swap it by name. The temporal attention's linears see [B·S, T, C] (one row per frame), except on the
frame-major path (temporal core "short_triton" with row-order-free linears, `Attention.runs_frame_major`), where
they see the same rows as [B, T, S, C] and no permute copies are made.
When the linears after a LayerNorm + modulation or after the MLP's GELU are low-bit layers
(``qdiff.lowbit.IntLinear``, ``FP8Linear``) with fusion on, the block hands them their input already quantized by one
fused kernel (``qdiff.lowbit.fused``); so it does after a residual add (`STDiTBlock._residual`: the kernel also writes
the new residual stream; before the frame-major temporal linears it also adds the temporal table to their input,
not to the stream); every other model runs the eager ops. At inference a block's last residual add (the MLP's) is
handed to the next block (`STDiT.defer_mlp_residual`), where it runs in the quantization of the spatial q/k/v input.

``compile_blocks(model)`` compiles every block with torch.compile (static shapes, one graph per block, no graph
breaks) for inference: bf16, fake-quant (QuantLinear) and integer (IntLinear) models alike. The compiler fuses the
elementwise and layout work (modulation, gates, residuals, spatial<->temporal copies, LayerNorm, and the integer
layers' per-token activation quantization) into the kernels around the GEMMs and attention. While compiled, the text
is passed padded to ``model_max_length`` with a key mask instead of packed, and every block gets a temporal table
(zeros after the first) and a deferred MLP residual add to take (zeros for the first), so one graph serves all
blocks and prompt lengths with the same values; the temporal attention may run as matmul-softmax-matmul (the
default when compiled) or as the Triton kernel of `qdiff.kernels.short_attention`
(``temporal_attention="short_triton"``, also eagerly: `set_temporal_attention`), and the cross-attention as the
Triton kernel of `qdiff.kernels.cross_attention` (``cross_attention="triton"``, `set_cross_attention`; faster than
cuDNN's SDPA on an H100, docs/benchmarks.md session 15).
"""
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from safetensors import safe_open
from torch import nn

from qdiff.io import save_safetensors_atomic
from qdiff.kernels.cross_attention import cross_attention, cross_attention_fp8
from qdiff.kernels.short_attention import short_attention
from qdiff.layers.quant_linear import QuantLinear
from qdiff.lowbit.fused import (fp8_input, fp8_output_reader, fusable, quantize_gelu, quantize_layernorm_modulate,
                                quantize_residual)
from qdiff.lowbit.int_linear import LowBitLinear, QuantizedInput

from t2v.models.embeddings import (
    CaptionEmbedder,
    Mlp,
    PatchEmbed3D,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    t2i_modulate,
)

# Deterministic sin-cos tables: in the state dict (as in OpenSora), but filled from the config when a
# checkpoint lacks them (OpenSora itself discards them on load).
SINCOS_BUFFERS = ("pos_embed", "pos_embed_temporal")
TEMPORAL_POS = ("first_block", "every_block", "input")  # where the temporal table enters (STDiT temporal_pos)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONFIG_METADATA_KEY = "stdit_config"

STDIT_XL_2_CONFIG = dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√head_dim)·v. q [B, h, N, D], k/v [B, h, M, D], key_mask [B, 1, 1, M] bool (True = attend).

    OpenSora's non-flash path forms the scores in the model dtype and takes the softmax in float32.
    SDPA's fused kernels accumulate the softmax in float32 too, so in half precision this is at least
    as accurate; it only skips rounding the probabilities to half before the product with v.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√head_dim)·v as OpenSora's non-flash path computes it: q scaled, scores in the model dtype,
    softmax in float32, probabilities rounded to the model dtype before the product with v. q [B, h, N, d], k/v
    [B, h, M, d], key_mask [B, 1, 1, M] bool (True = attend) or None.

    For short sequences (the temporal attention's 16 frames) two batched matmuls and a softmax beat SDPA's kernels
    in eager on an H100 (0.39 vs 0.78 ms per block, ../shared/docs/PERF_FACTS.md); compiled, the softmax also fuses
    with the layout work around it (to be measured: bench/bench_int_step.py --compile --extra).
    """
    scores = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).float()  # [B, h, N, M]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1).to(q.dtype) @ v


# Attention.core: how a self-attention computes softmax(q·kᵀ/√d)·v from its q, k, v linears' outputs
ATTENTION_CORES = ("sdpa", "math", "short_triton")


def row_order_free(layer: nn.Module) -> bool:
    """True when `layer` maps every token row x[..., :] on its own, whatever the rows' order and leading shape, so the
    temporal attention may feed it frame-major [B, T, S, C] rows instead of [B·S, T, C] (`Attention.forward_frames`):
    nn.Linear; IntLinear / FP8Linear without per-frame TQE factors (per-token or static per-tensor activations);
    QuantLinear without per-frame factors, reference token grouping (ranges shared across the batch) or activation
    statistics being recorded (a per-sample max over the frame axis). Anything else, or a layer with forward hooks
    (they would see the other layout), counts as order-dependent."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return False
    if type(layer) is nn.Linear:
        return True
    if isinstance(layer, LowBitLinear):
        return layer.frame_scale is None
    if isinstance(layer, QuantLinear):
        act = layer.act_quantizer
        grouped = act is not None and getattr(act.cfg, "reference_token_grouping", False)
        return layer.frame_scale is None and not grouped and not layer.observe_act_stats
    return False


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` linears (with bias) and ``proj``.

    ``core`` picks the attention between the linears (the linears see the same inputs whichever it is):
    "sdpa" (default): `_attention` on [B', h, N, d] views; "math": `_math_attention` (`compile_blocks` sets it on
    the temporal attention); "short_triton": `qdiff.kernels.short_attention.short_attention` straight on the
    linears' [B', N, C] outputs (N ≤ 32: the temporal attention; a Triton kernel on CUDA, its PyTorch reference on
    the CPU). ``math_attention`` (bool) is the older switch, kept as a view of ``core``.

    With "short_triton" the temporal attention may also run frame-major (`forward_frames`, see `runs_frame_major`):
    ``frame_major``: "auto" (default) takes it when q/k/v are low-bit layers (IntLinear, FP8Linear), True whenever
    possible, False never (the permute path everywhere).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.core = "sdpa"
        self.qkv = None  # `merge_qkv`: q, k and v as one linear [C -> 3C] (inference)
        self.frame_major = "auto"  # when `forward_frames` may run (`runs_frame_major`): "auto", True or False

    @property
    def math_attention(self) -> bool:
        """True when ``core`` is "math" (the switch before ``core`` existed)."""
        return self.core == "math"

    @math_attention.setter
    def math_attention(self, enabled: bool) -> None:
        self.core = "math" if enabled else "sdpa"

    def input_linears(self) -> tuple[nn.Module, ...]:
        """The linears that read x: (qkv,) once merged (`merge_qkv`), else (q, k, v)."""
        return (self.q, self.k, self.v) if self.qkv is None else (self.qkv,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B', N, C] -> [B', N, C]; attention over the N tokens of each row."""
        if self.qkv is None:
            q, k, v = self.q(x), self.k(x), self.v(x)  # [B', N, C] each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B', N, C] views of one [B', N, 3C]
        if self.core == "short_triton":
            return self.proj(short_attention(q, k, v, self.num_heads))  # [B', N, C]
        if self.core not in ("sdpa", "math"):
            raise ValueError(f"Attention.core: expected one of {list(ATTENTION_CORES)}, got {self.core!r}")
        q, k, v = (rearrange(t, "B N (h d) -> B h N d", h=self.num_heads) for t in (q, k, v))
        out = _math_attention(q, k, v) if self.core == "math" else _attention(q, k, v)  # [B', h, N, d]
        return self.proj(rearrange(out, "B h N d -> B N (h d)"))

    def runs_frame_major(self, x: torch.Tensor) -> bool:
        """True when the temporal branch may call `forward_frames(x4)` instead of `forward` on the permuted rows:
        core "short_triton", ``frame_major`` on, no gradient to compute (training uses "sdpa"/"math" anyway), and
        every linear `row_order_free` (they then give the same rows in either layout). Reads module attributes only
        (no tensor values): under torch.compile it is decided once, at trace time.

        "auto" also asks for low-bit q/k/v: their GEMM adds the bias in its epilogue, so the merged output's three
        views reach the kernel as they are. After a float nn.Linear, inductor writes q, k and v out again (bias add
        and split, three copies), which cost more than the permutes save: on an H100 the compiled bf16 fast step took
        121.1 ms frame-major and 117.0 ms permuted, the W8A8 FP8 one 102.1 and 107.3 ms (docs/benchmarks.md,
        session 12)."""
        if self.core != "short_triton" or not self.frame_major:
            return False
        if self.frame_major == "auto" and not all(isinstance(layer, LowBitLinear) for layer in self.input_linears()):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(row_order_free(layer) for layer in (*self.input_linears(), self.proj))

    def forward_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, S, C] (frame-major: STDiT's token order) -> [B, T, S, C]; attention over the T frames at every
        (b, s): `forward` on "B T S C -> (B S) T C" without the two permute copies. The linears run on the rows in
        this order and the kernel reads q, k, v (or the merged qkv's three [B, T, S, C] views, token stride 3C) with
        strides. Only for `runs_frame_major` modules (row-order-free linears)."""
        if self.qkv is None:
            q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, S, C] each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, T, S, C] views of one [B, T, S, 3C]
        return self.proj(short_attention(q, k, v, self.num_heads))  # [B, T, S, C]


class MultiHeadCrossAttention(nn.Module):
    """Video tokens (queries) attend to text tokens (keys/values) of their own sample only.

    The text of all samples comes packed as one sequence [1, ΣL_b, C] (only valid tokens), as in
    OpenSora; ``kv_linear`` [2C, C] runs on that packed sequence (rows [0, C) give k, [C, 2C) v).
    Attending with a key-padding mask per sample is the same computation as OpenSora's
    block-diagonal xformers mask.

    ``core`` picks the attention between the linears (`set_cross_attention`): "sdpa" (default): `_attention` on
    [B, h, N, d] views; "math": `_math_attention`; "triton": in the padded form, `qdiff.kernels.cross_attention`
    straight on the [B, N, C] and [B, L, C] linear outputs (a Triton kernel on CUDA, its PyTorch reference on the
    CPU; the packed form runs SDPA). ``fp8_output`` (default False): with "triton" and an FP8 proj that takes fused
    inputs (`fp8_output_reader`) the kernel writes proj's per-token e4m3 codes instead of its bf16 output
    (`cross_attention_fp8`). Off by default: on an H100 the W8A8 FP8 step took 80.6 ms with it and 80.1 ms without
    (docs/benchmarks.md, session 15).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.core = "sdpa"  # or "math", "triton" (CROSS_ATTENTION_CORES); see `set_cross_attention`
        self.fp8_output = False  # "triton": quantize proj's input in the kernel (`cross_attention_fp8`)

    def forward(self, x: torch.Tensor | QuantizedInput, cond: torch.Tensor,
                cond_lens: list[int] | torch.Tensor | None) -> torch.Tensor:
        """x [B, N, C], cond [1, ΣL_b, C] (packed valid text tokens), cond_lens [B] python ints -> [B, N, C].

        x may be a `QuantizedInput` made for q_linear (`qdiff.lowbit.fused`), its only reader.

        Padded form (what compiled blocks get, fixed shapes): cond [B, L, C] with cond_lens a bool key mask [B, L]
        (True = valid token) or None (all valid). kv_linear then also runs on the padding rows (as one packed
        sequence [1, B·L, C], so a per-token quantizer sees the same valid rows) and the mask hides them.
        """
        q = self.q_linear(x)  # [B, N, C]
        if not isinstance(cond_lens, (list, tuple)):  # padded text with a key mask (or none)
            batch, length, channels = cond.shape
            kv = self.kv_linear(cond.reshape(1, batch * length, channels)).reshape(batch, length, 2 * channels)
            if self.core == "triton":
                k, v = kv.chunk(2, dim=-1)  # [B, L, C] views
                if self.fp8_output and fp8_output_reader(self.proj):  # the kernel writes proj's e4m3 codes
                    codes, scale = cross_attention_fp8(q, k, v, cond_lens, self.num_heads,
                                                       fast=self.proj.fast_act_quant(),
                                                       backend=self.proj.act_quant_backend())
                    return self.proj(fp8_input(self.proj, codes, scale, q.shape, q.dtype))
                return self.proj(cross_attention(q, k, v, cond_lens, self.num_heads))
            q = rearrange(q, "B N (h d) -> B h N d", h=self.num_heads)
            k, v = rearrange(kv, "B L (two h d) -> two B h L d", two=2, h=self.num_heads).unbind(0)
            key_mask = None if cond_lens is None else cond_lens[:, None, None, :]  # [B, 1, 1, L]
            out = (_math_attention if self.core == "math" else _attention)(q, k, v, key_mask)  # [B, h, N, d]
            return self.proj(rearrange(out, "B h N d -> B N (h d)"))
        q = rearrange(q, "B N (h d) -> B h N d", h=self.num_heads)
        kv = rearrange(self.kv_linear(cond)[0], "L (two h d) -> two L h d", two=2, h=self.num_heads)
        # unpack the text of each sample: [ΣL_b, h, d] -> [B, L_max, h, d] (zero padded)
        k = nn.utils.rnn.pad_sequence(kv[0].split(cond_lens), batch_first=True)
        v = nn.utils.rnn.pad_sequence(kv[1].split(cond_lens), batch_first=True)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, h, L_max, d]
        key_mask = None
        if min(cond_lens) != k.shape[2]:  # some sample has padding
            lens = torch.tensor(cond_lens, device=cond.device)
            positions = torch.arange(k.shape[2], device=cond.device)
            key_mask = (positions[None] < lens[:, None])[:, None, None]  # [B, 1, 1, L_max]
        out = (_math_attention if self.core == "math" else _attention)(q, k, v, key_mask)  # [B, h, N, d]
        return self.proj(rearrange(out, "B h N d -> B N (h d)"))


class STDiTBlock(nn.Module):
    """Spatial attention, temporal attention, cross-attention and MLP, modulated by the timestep (adaLN-single).

    Args:
        hidden_size: C.
        num_heads: attention heads (head_dim = C / num_heads).
        num_temporal: T (token frames).
        num_spatial: S (tokens per frame).
        mlp_ratio: MLP hidden size / C.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_temporal: int, num_spatial: int, mlp_ratio: float):
        super().__init__()
        self.num_temporal = num_temporal
        self.num_spatial = num_spatial
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.attn_temp = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t0: torch.Tensor,
        y_lens: list[int] | torch.Tensor | None,
        temporal_pos_embed: torch.Tensor | None = None,
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
        defer_residual: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T·S, C], y [1, ΣL_b, C] packed text, t0 [B, 6C], y_lens [B] -> [B, T·S, C].

        Or y [B, L, C] padded text with y_lens its bool key mask [B, L] or None (`MultiHeadCrossAttention`).

        temporal_pos_embed [1, T, C] is added to the temporal attention's input (first block only). The temporal
        attention runs on x viewed as [B, T, S, C] (`Attention.forward_frames`) when `Attention.runs_frame_major`,
        else on the permuted copy [B·S, T, C].

        pending: the previous block's deferred MLP residual add, (branch [B, T·S, C], gate [B, 1, C]): this block's
        input is x + gate·branch, added in the quantization of the spatial q/k/v input where it can be
        (`_residual`). defer_residual: return (x [B, T·S, C], MLP output [B, T·S, C], gate_mlp [B, 1, C]) instead
        of their sum x + gate_mlp·MLP output.
        """
        T, S = self.num_temporal, self.num_spatial
        modulation = self.scale_shift_table[None] + rearrange(t0, "B (six C) -> B six C", six=6)  # [B, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # [B, 1, C] each

        # 1. spatial self-attention over the S tokens of each frame
        x_s = None
        if pending is not None:
            branch, gate = pending
            x, x_s = self._residual(x, branch, gate, *self.attn.input_linears(), norm=self.norm1, shift=shift_msa,
                                    scale=scale_msa)
        if x_s is None:
            x_s = self._modulated(x, self.norm1, shift_msa, scale_msa, *self.attn.input_linears())
        x_s = x_s.reshape(x.shape[0] * T, S, x.shape[-1])  # "B (T S) C -> (B T) S C"
        x_s = rearrange(self.attn(x_s), "(B T) S C -> B (T S) C", T=T, S=S)
        # frame-major, the temporal linears read the new x (+ the table) in the token order as it is: the residual add
        # and the table add run in their quantization (x_q: the new x + the table, quantized; the new x has no table)
        frame_major = self.attn_temp.runs_frame_major(x)  # decided once per forward (it walks the parameters)
        table = None  # [T, C]: the [1, T, C] table the temporal input adds to every (b, s)
        if temporal_pos_embed is not None and temporal_pos_embed.shape[:2] == (1, T):
            table = temporal_pos_embed[0]
        fuse = frame_major and (temporal_pos_embed is None or table is not None)
        x, x_q = self._residual(x, x_s, gate_msa, *(self.attn_temp.input_linears() if fuse else ()), table=table)

        # 2. temporal self-attention over the T frames at each position; no norm/modulation and the
        #    spatial gate again, as released (METHOD.md section 1)
        if frame_major:  # in the token order as it is: no permute copies
            if x_q is not None:
                x_t = x_q.reshape(x.shape[0], T, S, x.shape[-1])  # the table is in it
            else:
                x_t = x.view(x.shape[0], T, S, x.shape[-1])
                if temporal_pos_embed is not None:
                    x_t = x_t + temporal_pos_embed[:, :, None]  # [1, T, 1, C]
            x_t = self.attn_temp.forward_frames(x_t).view(x.shape)
        else:
            x_t = rearrange(x, "B (T S) C -> (B S) T C", T=T, S=S)
            if temporal_pos_embed is not None:
                x_t = x_t + temporal_pos_embed
            x_t = rearrange(self.attn_temp(x_t), "(B S) T C -> B (T S) C", T=T, S=S)
        x, x_q = self._residual(x, x_t, gate_msa, self.cross_attn.q_linear)

        # 3. cross-attention to the sample's own text tokens (no gate)
        cross = self.cross_attn(x if x_q is None else x_q, y, y_lens)
        x, h = self._residual(x, cross, None, self.mlp.fc1, norm=self.norm2, shift=shift_mlp, scale=scale_mlp)

        # 4. MLP
        if h is None:
            h = self._modulated(x, self.norm2, shift_mlp, scale_mlp, self.mlp.fc1)
        if defer_residual:
            return x, self._mlp(h), gate_mlp
        return x + gate_mlp * self._mlp(h)

    @staticmethod
    def _modulated(x, norm, shift, scale, *readers):
        """t2i_modulate(norm(x), shift, scale), or the same activation already quantized for its integer readers."""
        fused = quantize_layernorm_modulate(x, norm, shift, scale, *readers)
        return t2i_modulate(norm(x), shift, scale) if fused is None else fused

    @staticmethod
    def _residual(x, y, gate, *readers, norm=None, shift=None, scale=None, table=None):
        """(x + gate·y (gate None: x + y), None) as the eager ops; or, when `readers` (low-bit layers with fusion on)
        read the new x (norm given: t2i_modulate(norm(x), shift, scale); table [T, C] given: the new x viewed
        [B, T, S, C] + table[:, None]), (the new x, their QuantizedInput) from one kernel pass that also writes the
        new x (`qdiff.lowbit.fused.quantize_residual`). The eager result never holds the table: the caller adds it
        when the QuantizedInput is None."""
        fused = (quantize_residual(x, y, gate, *readers, norm=norm, shift=shift, scale=scale, table=table)
                 if readers else None)
        if fused is not None:
            return fused
        return x + (y if gate is None else gate * y), None

    def _mlp(self, h):
        """self.mlp(h); with an integer fc2, the GELU runs inside the quantization of fc2's input."""
        mlp = self.mlp
        if not fusable(mlp.fc2):
            return mlp(h)
        hidden = mlp.fc1(h)
        fused = quantize_gelu(hidden, mlp.act, mlp.fc2)
        return mlp.fc2(mlp.act(hidden) if fused is None else fused)


class FinalLayer(nn.Module):
    """LayerNorm, modulation by t (its own [2, C] table) and Linear(C -> patch volume · C_out)."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], t [B, C] -> [B, N, p_t·p_h·p_w·C_out]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, C] each
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class STDiT(nn.Module):
    """Spatial-temporal DiT of OpenSora v1.0, constructible with OpenSora's keyword names.

    Args:
        input_size: latent (T, H, W) the model is built for; it fixes the token grid and the sin-cos tables.
        in_channels: latent channels.
        patch_size: (p_t, p_h, p_w).
        hidden_size: C.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden size / C.
        class_dropout_prob: caption dropout probability in training (classifier-free guidance).
        pred_sigma: also predict the variance (C_out = 2·in_channels).
        drop_path: stochastic depth; only 0 is supported (OpenSora v1.0 inference and our distillation use 0).
        no_temporal_pos_emb: only False; OpenSora v1.0 stores the flag but always adds the temporal table.
        caption_channels: C_cap.
        model_max_length: L, text tokens per caption.
        dtype: parameter dtype the model is built in (torch.dtype or its name); inputs are cast to the
            parameters' dtype in ``forward`` either way.
        space_scale, time_scale: positions are divided by these in the sin-cos tables.
        freeze: None, "not_temporal" (train only ``attn_temp``) or "text" (freeze ``cross_attn``).
        enable_flashattn, enable_layernorm_kernel: accepted and ignored (SDPA picks the kernel).
        enable_sequence_parallelism: only False.
        temporal_pos: where the temporal sin-cos table enters; not an OpenSora option. "first_block" (default,
            OpenSora v1.0's model): the first block's temporal-attention input only, so frame order reaches the
            residual stream only through attention. "every_block": every block's temporal-attention input.
            "input": also added to the token embeddings together with the spatial table (as Latte does), so every
            token carries its frame index. Training options of the tiny model (docs/tiny_model.md); no weights.
    """

    def __init__(
        self,
        input_size=(1, 32, 32),
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        pred_sigma=True,
        drop_path=0.0,
        no_temporal_pos_emb=False,
        caption_channels=4096,
        model_max_length=120,
        dtype=torch.float32,
        space_scale=1.0,
        time_scale=1.0,
        freeze=None,
        enable_flashattn=False,
        enable_layernorm_kernel=False,
        enable_sequence_parallelism=False,
        temporal_pos="first_block",
    ):
        super().__init__()
        if drop_path != 0:
            raise ValueError(f"drop_path={drop_path} is not supported (stochastic depth is for training from scratch)")
        if no_temporal_pos_emb:
            raise ValueError(
                "no_temporal_pos_emb=True is not supported: OpenSora v1.0 ignores the flag (it always adds the table)"
            )
        if enable_sequence_parallelism:
            raise ValueError("enable_sequence_parallelism=True is not supported: qvdit runs STDiT on one device")
        if temporal_pos not in TEMPORAL_POS:
            raise ValueError(f"temporal_pos must be one of {TEMPORAL_POS}, got {temporal_pos!r}")
        if freeze not in (None, "not_temporal", "text"):
            raise ValueError(f"freeze must be None, 'not_temporal' or 'text', got {freeze!r}")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.config = dict(
            input_size=list(input_size), in_channels=in_channels, patch_size=list(patch_size),
            hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=float(mlp_ratio),
            class_dropout_prob=class_dropout_prob, pred_sigma=pred_sigma, drop_path=drop_path,
            no_temporal_pos_emb=no_temporal_pos_emb, caption_channels=caption_channels,
            model_max_length=model_max_length, dtype=str(dtype).removeprefix("torch."),
            space_scale=space_scale, time_scale=time_scale, freeze=freeze, enable_flashattn=enable_flashattn,
            enable_layernorm_kernel=enable_layernorm_kernel, enable_sequence_parallelism=enable_sequence_parallelism,
        )  # fmt: skip
        if temporal_pos != "first_block":  # not an OpenSora option: recorded only when set, so OpenSora configs stay
            self.config["temporal_pos"] = temporal_pos
        self.temporal_pos = temporal_pos
        self.input_size = tuple(input_size)
        self.patch_size = tuple(patch_size)
        self.out_channels = 2 * in_channels if pred_sigma else in_channels
        self.grid_size = tuple(n // p for n, p in zip(self.input_size, self.patch_size))  # (T, H', W')
        self.num_temporal = self.grid_size[0]
        self.num_spatial = self.grid_size[1] * self.grid_size[2]
        self.grad_checkpointing = False
        # fixed-shape block inputs for compiled blocks (set by compile_blocks): the text padded with a key mask instead
        # of packed, a temporal table for every block (zeros after the first: x + 0 is x) and, with deferred MLP
        # residual adds, a zero one for the first block, so one compiled graph serves every block and every prompt
        # length
        self.static_block_inputs = False
        # the compiled functions (not bound methods: a deepcopy must not run the original's) of `add_position_tables`
        # ("tables") and `output_head` ("head"), called with the model first; set by compile_blocks; empty: eager
        self._compiled_ends: dict[str, Callable] = {}
        # inference (autograd off) hands each block's MLP residual add to the next block (STDiTBlock's `pending`),
        # where it runs inside the next block's norm1 quantization when its q/k/v are fused low-bit layers, and
        # otherwise as the same eager add: the same ops, the same numbers. With autograd on the add stays in its block:
        # deferred, a checkpointed block would keep two activations (the stream and the MLP output) instead of one
        self.defer_mlp_residual = True

        self.register_buffer("pos_embed", self.spatial_pos_embed(), persistent=True)  # [1, S, C]
        self.register_buffer("pos_embed_temporal", self.temporal_pos_embed(), persistent=True)  # [1, T, C]
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob, model_max_length)
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, self.num_temporal, self.num_spatial, mlp_ratio) for _ in range(depth)
        )
        patch_volume = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.final_layer = FinalLayer(hidden_size, patch_volume, self.out_channels)

        if freeze == "not_temporal":
            for name, param in self.named_parameters():
                param.requires_grad_("attn_temp" in name)
        elif freeze == "text":
            for name, param in self.named_parameters():
                param.requires_grad_("cross_attn" not in name)
        self.to(dtype)

    def spatial_pos_embed(self) -> torch.Tensor:
        """The deterministic spatial table [1, S, C] (float32) for this config."""
        table = get_2d_sincos_pos_embed(self.config["hidden_size"], self.grid_size[1:], self.config["space_scale"])
        return table[None]

    def temporal_pos_embed(self) -> torch.Tensor:
        """The deterministic temporal table [1, T, C] (float32) for this config."""
        return get_1d_sincos_pos_embed(self.config["hidden_size"], self.num_temporal, self.config["time_scale"])[None]

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant) to save memory."""
        self.grad_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict noise (and variance interpolation values) for a batch of noisy video latents.

        Args:
            x: [B, C_in, T, H, W] noisy latents, (T, H, W) = ``input_size`` up to patch padding.
            timestep: [B] diffusion timesteps (int or float).
            y: [B, 1, L, C_cap] caption embeddings.
            mask: [B_m, L] text mask (int or bool, nonzero = valid token), or None (all L tokens valid).
                As in OpenSora, a mask with fewer rows than y is repeated to y's batch (CFG passes the
                cond mask only, so the uncond half reuses it).

        Returns:
            [B, C_out, T, H, W] float32 (T, H, W rounded up to patch multiples), C_out = 2·C_in when pred_sigma.
        """
        dtype = self.x_embedder.proj.weight.dtype
        T, S = self.num_temporal, self.num_spatial
        # OpenSora casts the timestep to the model dtype before its float32 sinusoid (rounds t in bf16)
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)

        # 1. patchify and add the spatial table to every frame
        x = self.x_embedder(x)  # [B, T·S, C]
        if x.shape[1] != T * S:
            raise ValueError(
                f"input gives {x.shape[1]} tokens, but the model was built for input_size {list(self.input_size)} "
                f"({T}x{S} tokens)"
            )
        x = self._compiled_ends.get("tables", type(self).add_position_tables)(self, x)  # [B, T·S, C] token-major

        # 2. timestep: t [B, C] for the final layer, t0 [B, 6C] for the blocks
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)

        # 3. captions: project, then pack the valid tokens of all samples into one sequence
        y = self.y_embedder(y, self.training)  # [B, 1, L, C]
        if self.static_block_inputs:  # fixed shapes for compiled blocks: [B, L, C] and a key mask [B, L] (or None)
            # a training step or a CUDA-graph capture (qdiff.cuda_graphs) must not wait for the device
            capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
            y, y_lens = self._pad_text(y, mask, wait_for_check=not (self.training or capturing))
        else:
            y, y_lens = self._pack_text(y, mask)  # [1, ΣL_b, C], [B]

        # 4. blocks; the temporal table enters the first block's temporal attention only (OpenSora v1.0), or every
        #    block's with temporal_pos="every_block"
        no_table = torch.zeros_like(self.pos_embed_temporal) if self.static_block_inputs else None
        defer = self.defer_mlp_residual and not torch.is_grad_enabled()
        pending = None  # the previous block's deferred MLP residual add: (branch [B, T·S, C], gate [B, 1, C])
        if defer and self.static_block_inputs:
            # block 0 takes a zero add (x + 0·0 is x), its gate laid out as a modulation chunk (strides included), so
            # one compiled graph still serves every block
            pending = (torch.zeros_like(x), torch.zeros_like(t0).view(x.shape[0], 6, -1)[:, 5:])
        for i, block in enumerate(self.blocks):
            with_table = i == 0 or self.temporal_pos == "every_block"
            temporal_pos_embed = self.pos_embed_temporal if with_table else no_table
            if defer:
                x, branch, gate = block(x, y, t0, y_lens, temporal_pos_embed, pending=pending, defer_residual=True)
                pending = (branch, gate)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, t0, y_lens, temporal_pos_embed, use_reentrant=False)
            else:
                x = block(x, y, t0, y_lens, temporal_pos_embed)

        # 5. the last block's deferred add, final layer and unpatchify, output in float32 as OpenSora does
        return self._compiled_ends.get("head", type(self).output_head)(self, x, t, pending)

    def add_position_tables(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T·S, C] (the patch embedder's output) -> [B, T·S, C] contiguous: the spatial table added to every
        frame (and the temporal one to every position with ``temporal_pos="input"``). Compiled with the blocks."""
        T, S = self.num_temporal, self.num_spatial
        x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S) + self.pos_embed  # [1, S, C] broadcasts over B, T
        if self.temporal_pos == "input":
            x = x + self.pos_embed_temporal[:, :, None]  # [1, T, 1, C] broadcasts over B, S
        # one copy to token-major memory: the embedder's output is a transposed view ([B, C, N] underneath) and the
        # residual stream would keep that layout through every block (each residual add then reads x with stride N:
        # 0.32 ms instead of ~0.1 per block in the compiled XL/2 step on an H100, docs/benchmarks.md session 12)
        return rearrange(x, "B T S C -> B (T S) C").contiguous()

    def output_head(self, x: torch.Tensor, t: torch.Tensor,
                    pending: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T·S, C] after the last block, t [B, C], pending: the last block's deferred MLP residual add (branch
        [B, T·S, C], gate [B, 1, C]) or None -> [B, C_out, T, H, W] float32: the add, the final layer, unpatchify.
        Compiled with the blocks."""
        if pending is not None:
            branch, gate = pending
            x = x + gate * branch
        x = self.final_layer(x, t)  # [B, T·S, p_t·p_h·p_w·C_out]
        return self.unpatchify(x).float()  # [B, C_out, T, H, W]

    @staticmethod
    def _pack_text(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """y [B, 1, L, C], mask [B_m, L] or None -> packed valid tokens [1, ΣL_b, C] and lengths L_b [B]."""
        batch, _, length, channels = y.shape
        if mask is None:
            return y.reshape(1, batch * length, channels), [length] * batch
        if mask.dim() != 2 or mask.shape[1] != length or batch % mask.shape[0]:
            raise ValueError(f"mask must be [B, {length}] with B dividing {batch}, got {list(mask.shape)}")
        mask = mask.repeat(batch // mask.shape[0], 1) != 0  # [B, L]
        y_lens = mask.sum(dim=1).tolist()
        if min(y_lens) == 0:
            raise ValueError("every sample needs at least one valid text token (a mask row is all zero)")
        return y[:, 0][mask][None], y_lens

    @staticmethod
    def _pad_text(y: torch.Tensor, mask: torch.Tensor | None,
                  wait_for_check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y [B, 1, L, C], mask [B_m, L] or None -> y [B, L, C] and the key mask [B, L] bool (None: all valid).

        The padded counterpart of `_pack_text` (same checks): every valid token keeps its values.
        wait_for_check=False checks the mask on the device instead of waiting for it (`torch._assert_async`: a
        training step then never waits for the GPU here; a failure surfaces as a device-side assert).
        """
        batch, _, length, channels = y.shape
        if mask is None:
            return y[:, 0], None
        if mask.dim() != 2 or mask.shape[1] != length or batch % mask.shape[0]:
            raise ValueError(f"mask must be [B, {length}] with B dividing {batch}, got {list(mask.shape)}")
        mask = mask.repeat(batch // mask.shape[0], 1) != 0  # [B, L]
        if not wait_for_check:
            torch._assert_async(mask.any(dim=1).all(), "every sample needs at least one valid text token")
        elif not bool(mask.any(dim=1).all()):
            raise ValueError("every sample needs at least one valid text token (a mask row is all zero)")
        return y[:, 0], mask

    def compile_blocks(self, enabled: bool = True, *, temporal_attention: str = "math", **compile_kwargs) -> "STDiT":
        """torch.compile every block in place (or undo it); see the module function `compile_blocks`."""
        return compile_blocks(self, enabled, temporal_attention=temporal_attention, **compile_kwargs)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T·H'·W', p_t·p_h·p_w·C_out] -> [B, C_out, T·p_t, H'·p_h, W'·p_w]."""
        (n_t, n_h, n_w), (p_t, p_h, p_w) = self.grid_size, self.patch_size
        return rearrange(
            x, "B (n_t n_h n_w) (p_t p_h p_w c) -> B c (n_t p_t) (n_h p_h) (n_w p_w)",
            n_t=n_t, n_h=n_h, n_w=n_w, p_t=p_t, p_h=p_h, p_w=p_w,
        )  # fmt: skip

    # ---- checkpoints -------------------------------------------------------------------------

    def load_state_dict_compat(self, state_dict: dict[str, torch.Tensor], assign: bool = False):
        """Strict load of a split-layout state dict, with or without the two sin-cos tables.

        The tables are always recomputed from this model's config (OpenSora discards checkpoint copies
        too), so a checkpoint made for another ``input_size`` still loads, and a model built on the meta
        device and materialised with ``to_empty`` gets real tables. Everything else must match exactly.
        """
        tables = {"pos_embed": self.spatial_pos_embed(), "pos_embed_temporal": self.temporal_pos_embed()}
        state_dict = {k: v for k, v in state_dict.items() if k not in SINCOS_BUFFERS}
        state_dict.update({name: table.to(getattr(self, name).device) for name, table in tables.items()})
        return self.load_state_dict(state_dict, strict=True, assign=assign)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` (config also in its metadata) and ``config.json``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(self.config, indent=1)
        state_dict = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_safetensors_atomic(state_dict, directory / WEIGHTS_NAME, metadata={"format": "pt", CONFIG_METADATA_KEY: config_json}, overwrite=True)
        tmp = directory / f".{CONFIG_NAME}.tmp-{os.getpid()}"
        tmp.write_text(config_json)
        os.replace(tmp, directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "STDiT":
        """Load a ``save_pretrained`` directory, or a split ``.safetensors`` file whose metadata holds the config."""
        path = Path(path)
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        if not weights.is_file():
            raise FileNotFoundError(f"no STDiT weights at {weights}")
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            config = json.loads((path / CONFIG_NAME).read_text())
        elif CONFIG_METADATA_KEY in metadata:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        else:
            raise FileNotFoundError(f"no {CONFIG_NAME} beside {weights} and no '{CONFIG_METADATA_KEY}' in its metadata")
        model = cls(**config)
        model.load_state_dict_compat(state_dict)
        return model


TEMPORAL_ATTENTION = ("math", "sdpa", "short_triton")  # compile_blocks' choices (ATTENTION_CORES)


def set_temporal_attention(model: STDiT, core: str = "sdpa") -> STDiT:
    """Set the ``core`` of every block's temporal attention (`Attention`); eager or compiled alike. Returns the model.

    "sdpa" is the eager default, "math" matmul-softmax-matmul, "short_triton" the Triton kernel of
    `qdiff.kernels.short_attention` (on CUDA; its reference on the CPU). Spatial attention stays SDPA. A block
    compiled already was traced with the core it had: compile after setting it (or use `compile_blocks`'
    ``temporal_attention``).
    """
    if core not in ATTENTION_CORES:
        raise ValueError(f"temporal_attention: expected one of {list(ATTENTION_CORES)}, got {core!r}")
    for block in model.blocks:
        block.attn_temp.core = core
    return model


@contextlib.contextmanager
def run_settings(model: STDiT, *, temporal_attention: str | None = None, static_block_inputs: bool | None = None):
    """Within the context the model runs with the given settings (None: leave that one as it is); on exit each goes
    back to what it was, every block's temporal attention core included.

    temporal_attention: every block's temporal attention core (`set_temporal_attention`).
    static_block_inputs: the blocks take fixed-shape inputs (padded text [B, L, C] with a key mask) instead of the
        packed valid tokens; the same function. Compiled blocks need it when the text lengths vary from batch to
        batch: packed, every new set of lengths compiles again, and past torch's recompile limit (8 graphs) the
        blocks silently run eagerly.
    Stage 4's compiled distillation runs under both (`t2v.pipeline.ptq.distill_settings`). Yields the model.
    """
    cores = [block.attn_temp.core for block in model.blocks]
    static = model.static_block_inputs
    if temporal_attention is not None:
        set_temporal_attention(model, temporal_attention)
    if static_block_inputs is not None:
        model.static_block_inputs = bool(static_block_inputs)
    try:
        yield model
    finally:
        for block, core in zip(model.blocks, cores):
            block.attn_temp.core = core
        model.static_block_inputs = static


CROSS_ATTENTION_CORES = ("sdpa", "math", "triton")  # MultiHeadCrossAttention.core


def set_cross_attention(model: STDiT, core: str = "sdpa") -> STDiT:
    """Set the ``core`` of every block's cross-attention (`MultiHeadCrossAttention`). Returns the model.

    "sdpa" is the default, "math" matmul-softmax-matmul, "triton" the kernel of `qdiff.kernels.cross_attention` (on
    CUDA; its reference on the CPU) in the padded-text form (``static_block_inputs``, as compiled blocks run); the
    packed form keeps SDPA. As with `set_temporal_attention`, compile after setting it.
    """
    if core not in CROSS_ATTENTION_CORES:
        raise ValueError(f"cross_attention: expected one of {list(CROSS_ATTENTION_CORES)}, got {core!r}")
    for block in model.blocks:
        block.cross_attn.core = core
    return model


def set_attention(model: STDiT, core: str = "sdpa") -> STDiT:
    """Set the ``core`` of every attention of every block (spatial, temporal and cross): "sdpa" (the default) or
    "math" (`_math_attention`: two matmuls and a float32 softmax). Returns the model.

    For training small models: their sequences are short (the tiny model: 64 spatial tokens, 8 frames, 12 text
    tokens), where compiled matmul-softmax-matmul can beat SDPA's fused kernels (docs/tiny_model.md, session 12).
    Set it before compiling.
    """
    if core not in ("sdpa", "math"):
        raise ValueError(f"attention: expected 'sdpa' or 'math', got {core!r}")
    for block in model.blocks:
        block.attn.core = block.attn_temp.core = block.cross_attn.core = core
    return model


def merge_qkv(model: nn.Module) -> dict[str, str]:
    """Merge q, k and v of every self-attention (`Attention`) of `model` into one linear ``qkv`` [C -> 3C], for
    inference: one activation quantization and one GEMM with N = 3C instead of three (`qdiff.lowbit.merge`).

    Works on float (nn.Linear), integer (IntLinear) and FP8 (FP8Linear) layers whose input side is identical; layers
    that cannot merge (fake-quant QuantLinear, TQE post terms, different smoothing, ...) stay as they are. The
    outputs are the same columns (exact for the integer GEMM; float GEMMs may pick other kernels, so the last bits
    can differ). Merge after loading weights and before compiling; export files hold unmerged layers.
    Returns {attention module name: why it was not merged} for the attentions left unmerged.
    """
    from qdiff.lowbit.merge import merge_linears, merge_problem

    skipped = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or module.qkv is not None:
            continue
        layers = [module.q, module.k, module.v]
        problem = merge_problem(layers)
        if problem is not None:
            skipped[name] = problem
            continue
        module.qkv = merge_linears(layers)
        del module.q, module.k, module.v
    return skipped


def compile_blocks(model: STDiT, enabled: bool = True, *, temporal_attention: str = "math",
                   cross_attention: str | None = None, mode: str | None = None, fullgraph: bool = True,
                   backend: str = "inductor", exact: bool = False, int_act_quant: str = "torch",
                   compile_ends: bool = True) -> STDiT:
    """Compile each STDiT block for inference with torch.compile (in place; returns the model).

    Each block is compiled with ``dynamic=False`` (and ``fullgraph`` by default: a graph break raises). The model
    switches to fixed-shape block inputs (``static_block_inputs``: padded text with a key mask, and a zero temporal
    table after the first block, and a zero deferred MLP residual add for the first block), so the 28 blocks of XL/2
    share one compiled graph and no prompt length recompiles; the temporal attention runs as ``temporal_attention``
    (`set_temporal_attention`): "math" (the default) matmul-softmax-matmul, "sdpa", or "short_triton" (the Triton
    kernel as one opaque custom op); the cross-attention as ``cross_attention`` when given (`set_cross_attention`:
    "sdpa", "math" or "triton", the kernel of `qdiff.kernels.cross_attention` as one custom op; None leaves the
    model's setting, SDPA by default); spatial attention stays SDPA. Works for float (bf16/fp16/fp32), fake-quant
    (QuantLinear) and integer (IntLinear) models: see `qdiff.api.compile_model` for mode, backend, exact and
    int_act_quant. ``compile_ends`` also compiles the model's work before the first block and after the last
    (`STDiT.add_position_tables`, `STDiT.output_head`: the position tables, the last deferred residual add, the final
    layer). Compilation happens at the first forward (minutes for XL/2 on a GPU). ``enabled=False`` restores the eager
    blocks and ends and switches the temporal and cross attention back to SDPA.

    The compiled path computes the same function; it is not bit-identical in half precision (the compiler keeps
    some intermediates in float32 that eager rounds; ``exact=True`` asks it to round as eager does).
    """
    from qdiff.api import compile_model, compile_options

    if temporal_attention not in TEMPORAL_ATTENTION:
        raise ValueError(f"temporal_attention: expected one of {list(TEMPORAL_ATTENTION)}, got {temporal_attention!r}")
    if cross_attention is not None or not enabled:
        set_cross_attention(model, cross_attention if enabled else "sdpa")  # validates the name
    set_temporal_attention(model, temporal_attention if enabled else "sdpa")
    model.static_block_inputs = enabled
    compile_model(model, enabled=enabled, modules=list(model.blocks), mode=mode, fullgraph=fullgraph,
                  backend=backend, exact=exact, int_act_quant=int_act_quant)
    # the elementwise work before the first block and after the last (about 1 ms of eager kernels per XL/2 step on an
    # H100, docs/benchmarks.md session 17) compiles into a few fused kernels
    options = compile_options(mode=mode, fullgraph=fullgraph, backend=backend, exact=exact)
    model._compiled_ends = ({"tables": torch.compile(type(model).add_position_tables, **options),
                             "head": torch.compile(type(model).output_head, **options)} if enabled and compile_ends
                            else {})
    return model


def STDiT_XL_2(**kwargs) -> STDiT:
    """STDiT-XL/2: 28 blocks, hidden 1152, 16 heads, patch (1, 2, 2) (759,620,768 parameters at 16x64x64)."""
    return STDiT(**{**STDIT_XL_2_CONFIG, **kwargs})
