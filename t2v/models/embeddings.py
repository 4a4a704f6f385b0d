"""Input embeddings of OpenSora v1.0's STDiT: patches, positions, timesteps and captions.

Notation: B batch, C hidden size, T frames, S = H'·W' spatial tokens per frame, L text tokens,
C_cap caption (T5) channels. Every table and layer here reproduces OpenSora v1.0 numerically,
including where it rounds through float32 (see the function docstrings).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN-single modulation of PixArt: ``x * (1 + scale) + shift`` (shift/scale broadcast, e.g. [B, 1, C])."""
    return x * (1 + scale) + shift


def _sincos_from_positions(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1-D table in float64: positions [M] -> [M, D] = cat[sin(p·ω), cos(p·ω)], ω_i = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], scale: float = 1.0) -> torch.Tensor:
    """Spatial table of OpenSora v1.0, float32 [H'·W', embed_dim], rows in raster order (row-major).

    The first half of the channels encodes the column (w) coordinate, the second half the row (h)
    coordinate. Positions are ``arange / scale`` in float32 (as OpenSora's numpy code computes them),
    the sin/cos in float64, and the result is rounded to float32. OpenSora reshapes its (H', W') mesh
    as (W', H') before flattening; a reshape keeps the flat order, so for non-square grids it has no
    effect on the values and is not reproduced as a separate step.
    """
    height, width = grid_size
    rows = torch.arange(height, dtype=torch.float32) / scale
    cols = torch.arange(width, dtype=torch.float32) / scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # [H', W'] each
    emb_cols = _sincos_from_positions(embed_dim // 2, grid_cols.reshape(-1))  # [H'W', D/2]
    emb_rows = _sincos_from_positions(embed_dim // 2, grid_rows.reshape(-1))  # [H'W', D/2]
    return torch.cat([emb_cols, emb_rows], dim=1).float()


def get_1d_sincos_pos_embed(embed_dim: int, length: int, scale: float = 1.0) -> torch.Tensor:
    """Temporal table of OpenSora v1.0, float32 [length, embed_dim]; positions ``arange / scale`` in float64."""
    positions = torch.arange(length, dtype=torch.float64) / scale
    return _sincos_from_positions(embed_dim, positions).float()


class PatchEmbed3D(nn.Module):
    """Video latents to patch tokens with a Conv3d whose kernel equals its stride.

    Args:
        patch_size: (p_t, p_h, p_w).
        in_channels: latent channels (4 for the SD VAE).
        embed_dim: hidden size C.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, T, H, W] -> tokens [B, T'·H'·W', C], T-major (frame, then row, then column).

        T, H and W are zero-padded at the end up to multiples of the patch size.
        """
        p_t, p_h, p_w = self.patch_size
        _, _, frames, height, width = x.shape
        pad = (0, -width % p_w, 0, -height % p_h, 0, -frames % p_t)  # (W, H, T) pairs, last dim first
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x)  # [B, C, T', H', W']
        return x.flatten(2).transpose(1, 2)  # [B, T'H'W', C]


class TimestepEmbedder(nn.Module):
    """Diffusion timestep -> [B, C]: 256-dim sinusoid cat[cos, sin] (max period 10000), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """t [B] (may be fractional) -> float32 [B, dim] = cat[cos(t·f), sin(t·f)], f_i = max_period^(-i/(dim/2)).

        Computed in float32 whatever the model dtype, as OpenSora does (this matters at t ~ 1000:
        float32 rounding of t·f changes the embedding by ~1e-5 against a float64 computation).
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            embedding = F.pad(embedding, (0, 1))
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, C] in the dtype of the MLP weights."""
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1, GELU-tanh, fc2 (the names of timm's ``Mlp``, as in OpenSora checkpoints)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 caption embedding -> hidden size, with caption dropout for classifier-free guidance.

    ``y_embedding`` [L, C_cap] is the learned null caption (a persistent buffer as in OpenSora, so it
    is in every checkpoint); the unconditional CFG branch feeds it as y.

    Args:
        caption_channels: C_cap (4096 for T5-XXL).
        hidden_size: C.
        class_dropout_prob: probability, in training only, to replace a sample's caption by the null caption.
        token_num: L (model_max_length).
    """

    def __init__(self, caption_channels: int, hidden_size: int, class_dropout_prob: float, token_num: int):
        super().__init__()
        self.class_dropout_prob = class_dropout_prob
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """caption [B, 1, L, C_cap] -> [B, 1, L, C].

        force_drop_ids [B] (1 = use the null caption) applies in any mode; otherwise, when ``train``,
        each sample is dropped with probability ``class_dropout_prob``.
        """
        if force_drop_ids is not None:
            drop = force_drop_ids == 1
        elif train and self.class_dropout_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.class_dropout_prob
        else:
            drop = None
        if drop is not None:
            if caption.shape[2:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption dropout needs captions of shape [B, 1, {', '.join(map(str, self.y_embedding.shape))}], "
                    f"got {list(caption.shape)}"
                )
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype), caption)
        return self.y_proj(caption)
