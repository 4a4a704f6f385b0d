"""Train the tiny text-to-video model (STDiT in pixel space + word-level T5) on procedural shape videos.

    python -m t2v.scripts.train_tiny --outdir checkpoints/tiny_t2v --max_minutes 7.5        # one GPU, ~8 min
    python -m t2v.scripts.train_tiny --outdir checkpoints/tiny_t2v --resume --max_minutes 5 # continue it
    python -m t2v.scripts.train_tiny --outdir logs/tiny_cpu --device cpu --steps 20 --batch_size 4 --depth 1

Writes model.safetensors (EMA weights, fp16, with configs/vocabulary/recipe in the metadata), train_state
.safetensors (for --resume), train_log.json, loss_curve.png and eval_samples.png to --outdir; see
docs/tiny_model.md. Every option below is a field of `t2v.pipeline.train_tiny.TrainConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv=None):
    from t2v.pipeline.train_tiny import TrainConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="checkpoints/tiny_t2v", help="output folder (default: checkpoints/tiny_t2v)")
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/train_state.safetensors")
    p.add_argument("--overwrite", action="store_true", help="start over even if a training state exists")
    p.add_argument("--state_path", default=None,
                   help="resumable training state (default: OUTDIR/train_state.safetensors, ~140 MB)")
    for f in dataclasses.fields(TrainConfig):
        kind = {bool: _bool, tuple: _ints}.get(type(f.default), type(f.default))
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        p.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"{f.metadata['help']} (default: {shown})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from t2v.pipeline.train_tiny import TrainConfig, train

    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        train(cfg, args.outdir, resume=args.resume, overwrite=args.overwrite,
              state_path=args.state_path, print_fn=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
