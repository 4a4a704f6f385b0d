"""Build the pieces of the text-to-video pipeline (DiT, VAE, text encoder, sampler) from an InferenceConfig."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from t2v.pipeline.config import ConfigError, InferenceConfig

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Model keys that are ours (not STDiT constructor arguments).
_MODEL_LOADER_KEYS = ("type", "from_pretrained", "init_seed")


def latent_size(cfg: InferenceConfig, vae) -> tuple[int, int, int]:
    """(T, H/f, W/f): the DiT's input_size for this video size and VAE."""
    f = vae.downsample_factor
    h, w = cfg.image_size
    if h % f or w % f:
        raise ConfigError(f"image_size {cfg.image_size} must be divisible by the VAE's downsample factor {f}")
    return (cfg.num_frames, h // f, w // f)


# stabilityai/sd-vae-ft-ema's AutoencoderKL config (its config.json): f = 8, 4 latent channels. Used only to build
# a RANDOM-weight stand-in (vae.type "sd_vae_random") for smoke runs of the full-size pipeline without the download.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}


def build_random_sd_vae(seed: int = 0, micro_batch_size: int | None = 128):
    """The SD VAE's architecture with RANDOM weights (seeded): the real one's shapes and cost, none of its output."""
    from t2v.models.vae import VideoAutoencoderKL

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        vae = VideoAutoencoderKL(config=dict(SD_VAE_CONFIG), micro_batch_size=micro_batch_size)
    return vae.eval()


def build_vae(cfg: InferenceConfig, device="cpu"):
    from t2v.models.vae import PixelVAE, VideoAutoencoderKL, build_tiny_vae

    vcfg = dict(cfg.vae)
    kind = vcfg.pop("type")
    if kind == "pixel":  # pixel-space model: the identity
        if vcfg:
            raise ConfigError(f"vae.type 'pixel' takes no other keys, got {sorted(vcfg)}")
        vae = PixelVAE()
    elif kind == "tiny":
        vae = build_tiny_vae(seed=vcfg.get("init_seed", 0))
        vae.micro_batch_size = vcfg.get("micro_batch_size", vae.micro_batch_size)
    elif kind == "VideoAutoencoderKL":
        vae = VideoAutoencoderKL(from_pretrained=vcfg["from_pretrained"], micro_batch_size=vcfg.get("micro_batch_size", 128))
    elif kind == "sd_vae_random":  # smoke runs only (bench/fullsize_pipeline.sh): decoded videos are noise
        unknown = sorted(set(vcfg) - {"init_seed", "micro_batch_size"})
        if unknown:
            raise ConfigError(f"vae.type 'sd_vae_random' takes init_seed and micro_batch_size, got {unknown}")
        logging.getLogger(__name__).warning("vae.type sd_vae_random: the SD VAE architecture with RANDOM weights "
                                            "(a smoke test stand-in for %s; videos are noise)", "stabilityai/sd-vae-ft-ema")
        vae = build_random_sd_vae(seed=vcfg.get("init_seed", 0), micro_batch_size=vcfg.get("micro_batch_size", 128))
    else:
        raise ConfigError(f"vae.type: expected 'VideoAutoencoderKL', 'sd_vae_random', 'tiny' or 'pixel', got {kind!r}")
    return vae.to(device).eval()


def build_text_encoder(cfg: InferenceConfig, device="cpu", dtype=torch.float32):
    from t2v.models.text_encoder import T5TextEncoder, build_tiny_text_encoder

    tcfg = dict(cfg.text_encoder)
    kind = tcfg.pop("type")
    if kind == "tiny":
        return build_tiny_text_encoder(seed=tcfg.get("init_seed", 0), model_max_length=tcfg.get("model_max_length", 8)).to(device)
    if kind == "t5":
        return T5TextEncoder(tcfg["from_pretrained"], model_max_length=tcfg.get("model_max_length", 120), device=device, dtype=dtype)
    if kind == "tiny_trained":  # the word-level T5 stored with the tiny trained DiT
        module, info = _load_tiny_trained(tcfg, "text_encoder")
        return T5TextEncoder(model=module.text, tokenizer=module.tokenizer, model_max_length=info["model_max_length"],
                             device=device, dtype=dtype)
    raise ConfigError(f"text_encoder.type: expected 't5', 'tiny' or 'tiny_trained', got {kind!r}")


def _load_tiny_trained(section: dict, name: str, path: str | None = None):
    """(TinyT2V, metadata) from `path` or section["from_pretrained"]; ConfigError naming the key and how to train."""
    from t2v.models.tiny_t2v import TRAIN_HINT, load_tiny_t2v

    unknown = sorted(set(section) - {"type", "from_pretrained", "init_seed"})
    if unknown:
        raise ConfigError(f"{name}.type 'tiny_trained' reads its configuration from the checkpoint; unexpected key(s) "
                          f"{unknown}")
    path = path or section.get("from_pretrained")
    if not path:
        raise ConfigError(f"{name}.from_pretrained: the tiny_trained checkpoint path is missing; {TRAIN_HINT}")
    if not Path(path).is_file():
        raise ConfigError(f"{name}.from_pretrained: tiny trained checkpoint not found: {path}; {TRAIN_HINT}")
    return load_tiny_t2v(path)


def build_model(cfg: InferenceConfig, input_size, ckpt_path: str | None = None, device="cpu", dtype=torch.float32):
    """STDiT from `cfg.model`; weights from `ckpt_path` (or `model.from_pretrained`), else seeded random init."""
    from t2v.models.checkpoint import load_state_dict_file
    from t2v.models.stdit import STDiT, STDiT_XL_2

    mcfg = dict(cfg.model)
    kind = mcfg.get("type")
    if kind == "tiny_trained":
        module, _ = _load_tiny_trained(mcfg, "model", ckpt_path)
        if cfg.scheduler.prediction not in (None, module.prediction):
            raise ConfigError(f"the tiny trained model predicts {module.prediction!r}, but scheduler.prediction is "
                              f"{cfg.scheduler.prediction!r}: set scheduler.prediction = {module.prediction!r} or leave it out")
        if tuple(module.dit.input_size) != tuple(input_size):
            raise ConfigError(f"the tiny trained model was trained for input (T, H, W) = "
                              f"{tuple(module.dit.input_size)}, but num_frames/image_size give {tuple(input_size)}")
        return module.dit.to(device=device, dtype=dtype).eval()
    path = ckpt_path or mcfg.get("from_pretrained")
    kwargs = {k: v for k, v in mcfg.items() if k not in _MODEL_LOADER_KEYS}
    kwargs["input_size"] = tuple(input_size)
    if kind == "STDiT-XL/2":
        factory = STDiT_XL_2
    elif kind == "STDiT":
        factory = STDiT
    else:
        raise ConfigError(f"model.type: expected 'STDiT-XL/2', 'STDiT' or 'tiny_trained', got {kind!r}")
    if path is None:
        torch.manual_seed(mcfg.get("init_seed", 0))
        model = factory(**kwargs)
        randomize_zero_init(model, seed=mcfg.get("init_seed", 0))
    else:
        if not Path(path).exists():
            raise ConfigError(
                f"model checkpoint not found: {path}. Download OpenSora-v1-HQ-16x512x512.pth from "
                "https://huggingface.co/hpcai-tech/Open-Sora and convert it with "
                "`python -m t2v.scripts.split_ckpt --src <it> --dst <path>` (shell_scripts/1_split_ckpt.sh)."
            )
        with torch.device("meta"):
            model = factory(**kwargs)
        model = model.to_empty(device="cpu")
        model.load_state_dict_compat(load_state_dict_file(path))
    return model.to(device=device, dtype=dtype).eval()


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the layers OpenSora zero-initialises small random values (N(0, 0.02²)), so a random preset is not the
    identity; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def model_prediction(cfg: InferenceConfig, ckpt_path: str | None = None) -> str:
    """What the DiT's first C output channels are: what a tiny_trained file records, else "eps" (OpenSora)."""
    from t2v.models.tiny_t2v import read_tiny_metadata

    if cfg.model.get("type") != "tiny_trained":
        return "eps"
    return read_tiny_metadata(ckpt_path or cfg.model["from_pretrained"]).get("prediction", "eps")


def build_sampler(cfg: InferenceConfig, num_sampling_steps: int | None = None, ckpt_path: str | None = None):
    """IDDPM from `cfg.scheduler`; the prediction is `scheduler.prediction`, or the model's (`model_prediction`)."""
    from t2v.schedulers.iddpm import IDDPM

    s = cfg.scheduler
    return IDDPM(
        num_sampling_steps=num_sampling_steps or s.num_sampling_steps,
        cfg_scale=s.cfg_scale,
        sampler=s.sampler,
        cfg_split=s.cfg_split,
        prediction=s.prediction or model_prediction(cfg, ckpt_path),
    )
