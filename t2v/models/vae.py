"""OpenSora v1.0's video VAE: the SD image VAE (diffusers `AutoencoderKL`) applied to every frame (METHOD.md §1).

Frames are independent: [B, C, T, H, W] -> [(B T), C, H, W], run in micro-batches of `micro_batch_size`
frames, and back. Latents are scaled by `scaling_factor` (0.18215) after encoding and unscaled before decoding.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

VAE_REPO = "stabilityai/sd-vae-ft-ema"
_DOWNLOAD_HINT = (
    f"It must hold the {VAE_REPO} files (config.json and diffusion_pytorch_model.safetensors or .bin). "
    f"Get them with `huggingface-cli download {VAE_REPO} --local-dir <path>` or from https://huggingface.co/{VAE_REPO}."
)


class VideoAutoencoderKL(nn.Module):
    """Per-frame SD VAE for videos.

    Args:
        from_pretrained: local folder with the sd-vae-ft-ema files (loaded with `local_files_only=True`).
        config: an `AutoencoderKL` config dict to build a randomly initialised VAE instead (tiny presets).
        micro_batch_size: frames per VAE call (128 in OpenSora v1.0); None = all frames at once.
        scaling_factor: latent scale (0.18215 for the SD VAE).
    """

    def __init__(self, from_pretrained: str | None = None, config: dict | None = None,
                 micro_batch_size: int | None = 128, scaling_factor: float = 0.18215):
        super().__init__()
        if (from_pretrained is None) == (config is None):
            raise ValueError("VideoAutoencoderKL: pass exactly one of from_pretrained or config")
        self.module = _load_local_vae(from_pretrained) if config is None else AutoencoderKL(**config)
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor

    @property
    def out_channels(self) -> int:
        """Latent channels (4)."""
        return self.module.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial downsampling f (8 for the SD VAE): each resolution level but the last halves H and W."""
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    def _frame_chunks(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """[N, ...] -> micro-batches of at most `micro_batch_size` frames."""
        if self.micro_batch_size is None:
            return [frames]
        return list(frames.split(self.micro_batch_size, dim=0))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               sample_posterior: bool = True) -> torch.Tensor:
        """x [B, 3, T, H, W] in [-1, 1] -> latents [B, 4, T, H/f, W/f] (scaled).

        As OpenSora, each frame's latent is a *sample* of the posterior (`latent_dist.sample()`), with noise
        from `generator`, drawn micro-batch by micro-batch; sample_posterior=False takes its mean instead.
        """
        batch = x.shape[0]
        frames = rearrange(x, "b c t h w -> (b t) c h w")
        latents = []
        for chunk in self._frame_chunks(frames):
            posterior = self.module.encode(chunk).latent_dist
            latent = posterior.sample(generator=generator) if sample_posterior else posterior.mean
            latents.append(latent * self.scaling_factor)
        return rearrange(torch.cat(latents, dim=0), "(b t) c h w -> b c t h w", b=batch)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents z [B, 4, T, h, w] (scaled) -> video [B, 3, T, h·f, w·f], nominally in [-1, 1] (not clamped)."""
        batch = z.shape[0]
        frames = rearrange(z, "b c t h w -> (b t) c h w")
        decoded = [self.module.decode(chunk / self.scaling_factor).sample for chunk in self._frame_chunks(frames)]
        return rearrange(torch.cat(decoded, dim=0), "(b t) c h w -> b c t h w", b=batch)


class PixelVAE(nn.Module):
    """The identity "VAE" of pixel-space models (the tiny trained model): latents are the video itself.

    encode: x [B, 3, T, H, W] -> x clamped to [-1, 1]; decode: z [B, 3, T, H, W] -> z clamped to [-1, 1].
    Same interface as `VideoAutoencoderKL` (out_channels 3, downsample_factor 1).
    """

    out_channels = 3
    downsample_factor = 1

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               sample_posterior: bool = True) -> torch.Tensor:
        return x.clamp(-1, 1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)


def _load_local_vae(path: str) -> AutoencoderKL:
    """AutoencoderKL from a local folder; a clear error when the folder is missing or incomplete."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {folder} not found or without config.json. {_DOWNLOAD_HINT}")
    try:
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load the VAE from {folder} ({err}). {_DOWNLOAD_HINT}") from err


def tiny_vae_config() -> dict:
    """A small `AutoencoderKL` config: two levels (f = 2), 4 latent channels, 8 normalisation groups."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    }


def build_tiny_vae(seed: int = 0, micro_batch_size: int | None = 128) -> VideoAutoencoderKL:
    """A randomly initialised (seeded) small VAE with the real one's interface; no download."""
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        vae = VideoAutoencoderKL(config=tiny_vae_config(), micro_batch_size=micro_batch_size)
    return vae.eval()
