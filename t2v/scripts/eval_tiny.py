"""How often a tiny shapes model draws what its captions say: the caption checker over captions × sampling seeds.

    python -m t2v.scripts.eval_tiny checkpoints/tiny_t2v_15min/model.safetensors            # 18 held-out x 4 seeds
    python -m t2v.scripts.eval_tiny MODEL --split train --cfg_scale 3 --out logs/eval_tiny.json

The measure of docs/tiny_model.md: the 18 captions of `shapes.heldout_prompts()` (or `train_prompts()`), sampling
seeds 2-5, IDDPM with 100 steps and CFG 4 (`t2v.pipeline.train_tiny.sample_videos`, the inference pipeline's
sampler), each video scored by `t2v.data.checker` (colour, shape, motion, all three). Prints one JSON object: the
accuracy per key in percent, the videos right per seed, and which shape the checker saw for each asked shape.
About 10 s on an H100 per seed; on a CPU, minutes.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a tiny model file (t2v.scripts.train_tiny's model.safetensors)")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout", help="which 18 captions")
    p.add_argument("--seeds", default="2,3,4,5", help="comma-separated sampling seeds")
    p.add_argument("--num_sampling_steps", type=int, default=100)
    p.add_argument("--cfg_scale", type=float, default=4.0)
    p.add_argument("--num_prompts", type=int, default=18, help="the first N captions of the split")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def caption_accuracy(module, prompts: list[str], seeds: list[int], num_steps: int, cfg_scale: float,
                     device) -> dict:
    """Sample every caption once per seed and score it: {"videos", "accuracy_pct" {colour, shape, motion, all},
    "all_per_seed", "shape_seen" {"<asked> -> <seen>": count}, "results" [per seed, per caption: the checker's
    dict]}."""
    from t2v.data.checker import analyse, check_video, classify, parse_caption
    from t2v.pipeline.train_tiny import sample_videos

    results, seen = [], collections.Counter()
    for seed in seeds:
        videos = sample_videos(module, prompts, num_steps, cfg_scale, seed, device).cpu()
        results.append([check_video(video, prompt) for video, prompt in zip(videos, prompts)])
        for video, prompt in zip(videos, prompts):
            found = classify(analyse(video))
            seen[f"{parse_caption(prompt)['shape']} -> {None if found is None else found['shape']}"] += 1
    flat = [r for per_seed in results for r in per_seed]
    keys = ("colour", "shape", "motion", "all")
    accuracy = {key: round(100 * sum(r[key] for r in flat) / len(flat), 1) for key in keys}
    return {"videos": len(flat), "accuracy_pct": accuracy, "all_per_seed": [sum(r["all"] for r in s) for s in results],
            "shape_seen": dict(sorted(seen.items())), "results": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from qdiff.io import atomic_path
    from t2v.data import shapes
    from t2v.models.tiny_t2v import load_tiny_t2v
    from t2v.scripts._common import fail

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        module, _ = load_tiny_t2v(args.model)
        prompts = (shapes.heldout_prompts() if args.split == "heldout" else shapes.train_prompts())[:args.num_prompts]
        report = caption_accuracy(module.to(device), prompts, seeds, args.num_sampling_steps, args.cfg_scale, device)
    except (ValueError, FileNotFoundError, OSError) as exc:
        return fail(exc)
    summary = {"model": args.model, "split": args.split, "seeds": seeds, "cfg_scale": args.cfg_scale,
               "num_sampling_steps": args.num_sampling_steps, **{k: v for k, v in report.items() if k != "results"}}
    text = json.dumps(summary, indent=1)
    if args.out:
        try:
            with atomic_path(args.out, overwrite=args.overwrite) as tmp:
                tmp.write_text(text + "\n")
        except (FileExistsError, OSError) as exc:
            return fail(exc)
        print(f"wrote {args.out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
