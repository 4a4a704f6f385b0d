"""Stage 2/5: text-to-video sampling with the DiT, the sampler and the VAE; one .mp4 + contact sheet per prompt.

Noise is drawn per prompt from a generator seeded with `seed + prompt_index`, so a prompt's video does
not depend on the batch size or on how prompts are sharded across processes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from t2v.pipeline.build import TORCH_DTYPES, build_model, build_sampler, build_text_encoder, build_vae, latent_size
from t2v.pipeline.config import InferenceConfig
from t2v.pipeline.text_embeds import load_text_embeds, select_prompts

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """Everything sampling needs, built once."""
    cfg: InferenceConfig
    model: torch.nn.Module
    vae: torch.nn.Module
    sampler: object
    device: torch.device
    dtype: torch.dtype
    text_encoder: object | None = None   # None when embeddings are precomputed
    text_embeds: dict | None = None
    runner: Callable | None = None  # what the sampler calls instead of `model` (a CUDA-graph replay); None = model

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """[C, T, H/f, W/f] of one prompt's latent."""
        return (self.vae.out_channels, *self.model_input_size)

    @property
    def model_input_size(self):
        return latent_size(self.cfg, self.vae)


def build_pipeline(cfg: InferenceConfig, ckpt_path=None, precomputed_text_embeds=None, device="cpu",
                   num_sampling_steps=None) -> Pipeline:
    device = torch.device(device)
    dtype = TORCH_DTYPES[cfg.dtype]
    vae = build_vae(cfg, device=device)
    model = build_model(cfg, latent_size(cfg, vae), ckpt_path=ckpt_path, device=device, dtype=dtype)
    if precomputed_text_embeds:
        text_encoder, embeds = None, load_text_embeds(precomputed_text_embeds)
    else:
        text_encoder, embeds = build_text_encoder(cfg, device=device), None
    return Pipeline(cfg, model, vae, build_sampler(cfg, num_sampling_steps, ckpt_path), device, dtype, text_encoder, embeds)


def encode_text(pipe: Pipeline, prompts: list[str]) -> dict:
    """-> dict(y [B,1,L,C], mask [B,L], y_null [B,1,L,C]) on the pipeline's device and dtype."""
    if pipe.text_embeds is not None:
        out = select_prompts(pipe.text_embeds, prompts)
        y_null = pipe.text_embeds["y_null"]
    else:
        out = pipe.text_encoder.encode(prompts)
        y_null = None
    if y_null is None:
        y_null = pipe.model.y_embedder.y_embedding[None, None]  # the learned null caption [1,1,L,C]
    b = len(prompts)
    return {
        "y": out["y"].to(pipe.device, pipe.dtype),
        "mask": out["mask"].to(pipe.device),
        "y_null": y_null.to(pipe.device, pipe.dtype).expand(b, -1, -1, -1),
    }


def initial_noise(pipe: Pipeline, seed: int, prompt_indices: list[int]) -> torch.Tensor:
    """z [B, C, T, h, w]: one draw per prompt, from seed + prompt index (float32 draw, then cast)."""
    zs = []
    for i in prompt_indices:
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        zs.append(torch.randn(pipe.latent_shape, generator=gen))
    return torch.stack(zs).to(pipe.device, pipe.dtype)


@torch.no_grad()
def sample_latents(pipe: Pipeline, prompts: list[str], prompt_indices: list[int], seed: int,
                   progress: bool = True, on_step: Callable | None = None) -> torch.Tensor:
    """Denoise from seeded noise -> latents [B, C, T, h, w]."""
    text = encode_text(pipe, prompts)
    z = initial_noise(pipe, seed, prompt_indices)
    gen = torch.Generator(device="cpu").manual_seed(seed + 10_000 + prompt_indices[0])
    return pipe.sampler.sample(pipe.runner or pipe.model, z, text["y"], mask=text["mask"], y_null=text["y_null"],
                               generator=gen, progress=progress, on_step=on_step)


@torch.no_grad()
def decode(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """latents [B,C,T,h,w] -> video [B,3,T,H,W] float32 in [-1, 1] (not clamped)."""
    return pipe.vae.decode(latents.to(pipe.device, torch.float32)).float()


def video_name(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", prompt).strip("_")[:40] or "prompt"
    return f"sample_{index:04d}_{slug}"


def generate_videos(pipe: Pipeline, prompts: list[str], outdir, seed: int | None = None,
                    prompt_indices: list[int] | None = None, batch_size: int | None = None,
                    progress: bool = True, overwrite: bool = False, on_step: Callable | None = None) -> list[Path]:
    """Sample, decode and save one `.mp4` and one contact-sheet `.png` per prompt under `outdir`.

    Returns the video paths. Also stores the raw latents (`<name>.latent.safetensors`) so stages can be
    compared numerically without decoding twice.
    """
    from t2v.pipeline.video_io import require_video_writer, save_contact_sheet, save_video
    from qdiff.io import save_safetensors_atomic

    require_video_writer()  # fail before sampling, not after it
    seed = pipe.cfg.seed if seed is None else seed
    batch_size = batch_size or pipe.cfg.batch_size
    prompt_indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        idx = prompt_indices[start:start + batch_size]
        names = [video_name(i, p) for i, p in zip(idx, batch)]
        if not overwrite:
            for n in names:
                if (outdir / f"{n}.mp4").exists():
                    raise FileExistsError(f"{outdir / (n + '.mp4')} already exists; pass --overwrite to replace it")
        latents = sample_latents(pipe, batch, idx, seed, progress=progress, on_step=on_step)
        videos = decode(pipe, latents)
        for n, lat, video in zip(names, latents, videos):
            save_safetensors_atomic({"latent": lat.float()}, outdir / f"{n}.latent.safetensors", overwrite=True)
            path = save_video(video, outdir / f"{n}.mp4", fps=pipe.cfg.fps, overwrite=overwrite)
            save_contact_sheet(video, outdir / f"{n}.png", overwrite=True)
            paths.append(Path(path))
            log.info("saved %s", path)
    return paths
