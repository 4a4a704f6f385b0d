"""Stage 3: capture calibration data (the DiT inputs x_t, t, y, mask of both CFG rows at every sampling step).

    python -m t2v.scripts.get_calib_data configs/opensora/tiny.py --outdir logs/tiny_calib_data   # CPU
    python -m t2v.scripts.get_calib_data configs/opensora/qvdit_16x512x512.py \
        --ckpt_path logs/split_ckpt/OpenSora-v1-HQ-16x512x512-split.safetensors \
        --precompute_text_embeds logs/text_embeds/t2v_samples_10.safetensors --outdir logs/calib_data
    torchrun --nproc_per_node 4 -m t2v.scripts.get_calib_data ...   # each rank captures its share of prompts

Writes one shard per prompt and, last, index.json (format: t2v/pipeline/calib_data.py). A killed run is
resumed by running it again: complete shards are kept unless --overwrite.
"""
from __future__ import annotations

import argparse
import logging
import sys

from t2v.scripts._common import add_common_args, fail, resolve_run, setup_logging

DEFAULT_OUTDIR = "logs/calib_data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--data_num", type=int, default=None,
                   help="calibration prompts: the first N of the prompt file (default 10, as the paper; "
                        "--num_prompts is accepted as a synonym)")
    p.add_argument("--x_dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="storage dtype of the latents x_t (float32: the reference's, 2x larger)")
    args = p.parse_args(argv)
    if args.outdir is None:
        args.outdir = DEFAULT_OUTDIR  # not the config's save_dir, which is for videos
    if None not in (args.num_prompts, args.data_num) and args.num_prompts != args.data_num:
        p.error(f"--data_num {args.data_num} and --num_prompts {args.num_prompts} disagree; pass one of them")
    args.num_prompts = args.data_num or args.num_prompts or 10
    if args.num_prompts < 1:
        p.error("--data_num must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from t2v.pipeline.calib_data import capture_calib_data, resolved_config, write_calib_index
    from t2v.pipeline.distributed import barrier, destroy_process_group_if_needed, init_process_group_if_needed
    from t2v.pipeline.sample import build_pipeline
    from t2v.pipeline.text_embeds import read_prompts

    errors = (ValueError, FileNotFoundError, FileExistsError, OSError)
    try:
        run = resolve_run(args)
        all_prompts = read_prompts(run.cfg.prompt_path)[: args.num_prompts]
        if len(all_prompts) < args.num_prompts:
            logging.getLogger("t2v").warning("--data_num %d, but %s holds only %d prompt(s): using them all",
                                             args.num_prompts, run.cfg.prompt_path, len(all_prompts))
        init_process_group_if_needed(run.device)
    except errors as exc:
        return fail(exc)

    # Every rank reaches the barrier, failed or not, so a failure never leaves the others waiting.
    error = None
    try:
        pipe = build_pipeline(run.cfg, ckpt_path=args.ckpt_path, precomputed_text_embeds=args.precompute_text_embeds,
                              device=run.device, num_sampling_steps=args.num_sampling_steps)
        capture_calib_data(pipe, run.prompts, run.indices, run.outdir, seed=run.cfg.seed, x_dtype=args.x_dtype,
                           overwrite=args.overwrite, progress=run.is_main, ckpt_path=args.ckpt_path,
                           write_index=False)
    except errors as exc:
        error = exc
    barrier()
    if error is None and run.is_main:
        try:  # rank 0 indexes every prompt; a shard another rank failed to write is named here
            write_calib_index(run.outdir, resolved_config(pipe), all_prompts, list(range(len(all_prompts))),
                              seed=run.cfg.seed, x_dtype=args.x_dtype, ckpt_path=args.ckpt_path)
        except errors as exc:
            error = exc
    destroy_process_group_if_needed()
    if error is not None:
        return fail(error)
    if run.is_main:
        logging.getLogger("t2v").info("calibration data for %d prompt(s) in %s", len(all_prompts), run.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
