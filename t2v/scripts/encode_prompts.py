"""Precompute text embeddings for a prompt file (the seeds' --precompute_text_embeds).

Loads the text encoder of CONFIG once, encodes every prompt and writes a safetensors file (format in
t2v/pipeline/text_embeds.py: y [N,1,L,C], mask [N,L], prompts in the metadata; with --ckpt_path also the
DiT's learned null caption y_null). Inference with --precompute_text_embeds FILE then skips T5 entirely
(the T5-XXL encoder takes about 10 GB and a minute to load).

    python -m t2v.scripts.encode_prompts configs/opensora/16x512x512.py \
        --prompt_path configs/prompts/t2v_samples_10.txt --out logs/text_embeds/t2v_samples_10.safetensors
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from t2v.scripts._common import fail, setup_logging


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="OpenSora-style .py config naming the text encoder")
    p.add_argument("--prompt_path", default=None, help="prompt file (default: the config's)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--ckpt_path", default=None, help="optional DiT checkpoint: store its null caption too")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from t2v.pipeline.build import build_text_encoder
    from t2v.pipeline.config import load_inference_config
    from t2v.pipeline.text_embeds import read_prompts, save_text_embeds

    try:
        cfg = load_inference_config(args.config)
        prompts = read_prompts(args.prompt_path or cfg.prompt_path)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = build_text_encoder(cfg, device=device)
        ys, masks = [], []
        with torch.no_grad():
            for i in range(0, len(prompts), args.batch_size):
                out = encoder.encode(prompts[i:i + args.batch_size])
                ys.append(out["y"].float().cpu())
                masks.append(out["mask"].cpu())
        y_null = None
        if args.ckpt_path:
            from t2v.models.checkpoint import load_state_dict_file
            y_null = load_state_dict_file(args.ckpt_path)["y_embedder.y_embedding"]
        path = save_text_embeds(args.out, torch.cat(ys), torch.cat(masks), prompts,
                                encoder_name=str(cfg.text_encoder), y_null=y_null, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, KeyError) as exc:
        return fail(exc)
    logging.getLogger("t2v").info("wrote embeddings of %d prompt(s) to %s", len(prompts), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
