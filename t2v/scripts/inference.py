"""Stage 2: floating-point text-to-video inference (OpenSora v1.0), one .mp4 + contact sheet per prompt.

    python -m t2v.scripts.inference configs/opensora/tiny.py                       # CPU, no download
    python -m t2v.scripts.inference configs/opensora/16x512x512.py \
        --ckpt_path logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors \
        --precompute_text_embeds logs/text_embeds/t2v_samples_10.safetensors
"""
from __future__ import annotations

import argparse
import logging
import sys

from t2v.scripts._common import (add_common_args, add_compile_arg, compile_if_requested, cuda_graph_if_requested,
                                 fail, resolve_run, resolve_speed_args, setup_logging)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_compile_arg(p)
    return resolve_speed_args(p.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from t2v.pipeline.sample import build_pipeline, generate_videos

    try:
        run = resolve_run(args)
        pipe = build_pipeline(run.cfg, ckpt_path=args.ckpt_path, precomputed_text_embeds=args.precompute_text_embeds,
                              device=run.device, num_sampling_steps=args.num_sampling_steps)
        compile_if_requested(pipe.model, args)
        cuda_graph_if_requested(pipe, args)
        paths = generate_videos(pipe, run.prompts, run.outdir, seed=run.cfg.seed, prompt_indices=run.indices,
                                progress=run.is_main, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        return fail(exc)
    logging.getLogger("t2v").info("wrote %d video(s) to %s", len(paths), run.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
