"""RANDOM-weight stand-ins for the OpenSora v1.0 files, for a full-size smoke run of stages 2-5 (issue 4).

    python -m t2v.scripts.make_random_fullsize --out logs/fullsize_random [--num_prompts 2] [--depth 28]

Nothing written here is a trained model: the pipeline runs the real architecture at its real size and cost
(STDiT-XL/2 at 16x512x512, the SD VAE's decoder, 120-token text embeddings of T5-XXL's width), and its videos
are noise. Writes into --out (each file name says RANDOM):
  stdit-xl2-RANDOM-split.safetensors   STDiT-XL/2 in the split format stage 1 writes (q/k/v, no sin-cos tables,
                                       the STDiT config in the metadata under "stdit_config"), seeded random
                                       weights as the pipeline's own random presets (`t2v.pipeline.build`)
  text_embeds-RANDOM.safetensors       --precompute_text_embeds file (t2v/pipeline/text_embeds.py) for the first
                                       --num_prompts prompts of the config's prompt file: y = 0.15·N(0, 1)
                                       [N, 1, 120, 4096], a mask of about 1.3 tokens per word, y_null = the
                                       checkpoint's null caption
  fullsize-RANDOM.py                   configs/opensora/qvdit_16x512x512.py (DDIM, CFG 4.0, fp32) resolved, with
                                       model.from_pretrained = the checkpoint and vae.type = "sd_vae_random" (the
                                       SD VAE's architecture with random weights; t2v/pipeline/build.py)
--depth N builds N blocks instead of 28 (everything else full size): a quick check on a CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from t2v.scripts._common import fail, setup_logging

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = REPO / "configs/opensora/qvdit_16x512x512.py"
CKPT_NAME = "stdit-xl2-RANDOM-split.safetensors"
EMBEDS_NAME = "text_embeds-RANDOM.safetensors"
CONFIG_NAME = "fullsize-RANDOM.py"
LATENT_SIZE = (16, 64, 64)  # 16x512x512 through the SD VAE (f = 8)


def model_section(ckpt_path: str | None, depth: int | None = None) -> dict:
    """The config's `model` dict: STDiT-XL/2, or the same widths with `depth` blocks."""
    from t2v.models.stdit import STDIT_XL_2_CONFIG

    section = {"type": "STDiT-XL/2", "space_scale": 1.0, "time_scale": 1.0, "from_pretrained": ckpt_path}
    if depth is not None and depth != STDIT_XL_2_CONFIG["depth"]:
        section = {**section, **STDIT_XL_2_CONFIG, "depth": depth, "type": "STDiT"}
    return section


def random_config(ckpt_path: str | None, depth: int | None = None, save_dir: str = "logs/fullsize_random/fp"):
    """The Q-VDiT inference config with the random checkpoint and the random-weight SD VAE."""
    from t2v.pipeline.config import load_inference_config

    cfg = load_inference_config(BASE_CONFIG)
    return cfg.replace(model=model_section(ckpt_path, depth), save_dir=save_dir,
                       vae={"type": "sd_vae_random", "init_seed": 0, "micro_batch_size": 128})


def write_checkpoint(path: Path, depth: int | None, seed: int, overwrite: bool) -> torch.nn.Module:
    """Seeded random STDiT (the pipeline's random init) -> split-format safetensors; returns the model."""
    from qdiff.io import save_safetensors_atomic
    from t2v.models.checkpoint import check_stdit_state_dict
    from t2v.models.stdit import CONFIG_METADATA_KEY, SINCOS_BUFFERS
    from t2v.pipeline.build import build_model

    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    section = {**model_section(None, depth), "init_seed": seed}
    model = build_model(random_config(None, depth).replace(model=section), LATENT_SIZE)
    config = {k: v for k, v in model.config.items() if k != "dtype"}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in SINCOS_BUFFERS}
    check_stdit_state_dict(state, config)  # as stage 1 does: a strict load into STDiT(**config) on meta
    save_safetensors_atomic(state, path, metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(config),
                                                   "note": "RANDOM weights (t2v.scripts.make_random_fullsize)"},
                            overwrite=True)
    return model


def token_count(prompt: str, max_length: int = 120) -> int:
    """About T5's token count: 1.3 tokens per word plus the end token, within [2, max_length]."""
    return max(2, min(max_length, 1 + round(1.3 * len(prompt.split()))))


def write_text_embeds(path: Path, prompts: list[str], y_null: torch.Tensor, seed: int, overwrite: bool) -> Path:
    from t2v.pipeline.text_embeds import save_text_embeds

    gen = torch.Generator().manual_seed(seed)
    length, channels = y_null.shape
    y = torch.randn(len(prompts), 1, length, channels, generator=gen) * 0.15
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        mask[row, :token_count(prompt, length)] = 1
    return save_text_embeds(path, y, mask, prompts, encoder_name="RANDOM (t2v.scripts.make_random_fullsize)",
                            y_null=y_null, overwrite=overwrite)


def write_config(path: Path, cfg, overwrite: bool) -> Path:
    """The resolved config as a standalone OpenSora-style .py file (no `_base_`)."""
    from qdiff.io import atomic_path

    data = json.loads(json.dumps(cfg.to_dict()))
    data.pop("source", None)
    lines = ["# RANDOM-weight full-size smoke run (t2v.scripts.make_random_fullsize): configs/opensora/qvdit_16x512x512.py",
             "# with a random STDiT checkpoint and vae.type sd_vae_random (the SD VAE's architecture, random weights)."]
    lines += [f"{key} = {value!r}" for key, value in data.items()]
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num_prompts", type=int, default=2, help="embed the first N prompts of the config's prompt file")
    p.add_argument("--depth", type=int, default=None, help="blocks (default 28: STDiT-XL/2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or (args.depth is not None and args.depth < 1):
        p.error("--num_prompts and --depth must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from t2v.pipeline.text_embeds import read_prompts

    log = logging.getLogger("t2v")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / CKPT_NAME
        model = write_checkpoint(ckpt, args.depth, args.seed, args.overwrite)
        cfg = random_config(str(ckpt.resolve()), args.depth, save_dir=str(out / "fp"))
        prompts = read_prompts(cfg.prompt_path)[: args.num_prompts]
        embeds = write_text_embeds(out / EMBEDS_NAME, prompts, model.y_embedder.y_embedding.detach().float(),
                                   args.seed + 1, args.overwrite)
        config = write_config(out / CONFIG_NAME, cfg, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        return fail(exc)
    params = sum(p.numel() for p in model.parameters())
    log.info("RANDOM weights: %s (%d blocks, %s parameters), %s (%d prompts), %s",
             ckpt, len(model.blocks), f"{params:,}", embeds, len(prompts), config)
    print(f"checkpoint={ckpt}\ntext_embeds={embeds}\nconfig={config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
