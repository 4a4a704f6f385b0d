"""Quality benchmark: FP vs every quantization method (naive PTQ, SmoothQuant, QuaRot, ViDiT-Q, Q-VDiT) at
W8A8, W4A8, W4A6, W3A6 on held-out prompts, scored by PSNR / SSIM to the FP video, temporal-consistency and
optical-flow deviation, relative latent error and the caption checker's accuracy. GPU or CPU.

    python bench/quality.py --small --threads 1 --out logs/quality_small.md   # CI size, ~30 s on a CPU
    python bench/quality.py --config configs/opensora/tiny_qvdit.py --methods ptq viditq qvdit --bits w4a6 w3a6
    python bench/quality.py --config configs/opensora/tiny_trained_qvdit.py --num_prompts 32 --calib_prompts 10

Runs in one process (t2v/eval/quality.py): FP videos once, calibration data once, then per run
calibrate -> quantized sampling with the same seeds -> metrics. A run whose <outdir>/<run>/result.json
exists is skipped (resume); --overwrite redoes everything. The table goes into the marked block of --out
(default docs/quality.md; a new file is created, other text of an existing one is kept), every number into
--json (default: --out with .json). See docs/quality.md for what each column means.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/quality.py` puts bench/ first on the path, not the repository
    sys.path.insert(0, str(REPO))
DEFAULT_CONFIG = "configs/opensora/tiny_qvdit.py"


def parse_args(argv=None):
    from t2v.eval.quality import BITS, METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"OpenSora-style inference config (default {DEFAULT_CONFIG})")
    p.add_argument("--ckpt_path", default=None, help="STDiT checkpoint (default: the config's model.from_pretrained)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="methods (default: all five)")
    p.add_argument("--bits", nargs="+", default=None, help=f"bit-widths (default: {' '.join(BITS)})")
    p.add_argument("--num_prompts", type=int, default=None, help="held-out evaluation prompts N (default 10)")
    p.add_argument("--calib_prompts", type=int, default=None, help="calibration prompts K (default 10)")
    p.add_argument("--prompt_path", default=None, help="evaluation prompts (default: the config's prompt_path); "
                   "without --calib_prompt_path its first K lines calibrate and the next N are evaluated")
    p.add_argument("--calib_prompt_path", default=None, help="a separate calibration prompt file (its first K lines)")
    p.add_argument("--num_sampling_steps", type=int, default=None, help="sampling steps (default: the config's)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                   help="quant-config override for every run, e.g. --set distill.iterations=2000 (repeatable)")
    p.add_argument("--small", action="store_true",
                   help="CI size: 2 prompts, 1 calibration prompt, 5 steps, ptq/viditq/qvdit at w8a8/w3a6, 20 "
                        "distillation iterations (explicit flags still win)")
    p.add_argument("--outdir", default=None, help="run folder (default logs/quality/<config name>[_small])")
    p.add_argument("--out", default="docs/quality.md", help="markdown document whose marked block gets the table")
    p.add_argument("--json", default=None, help="summary JSON (default: --out with suffix .json)")
    p.add_argument("--title", default=None, help="heading of the table block")
    p.add_argument("--note", default=None, help="a sentence printed above the table (e.g. what the weights are)")
    p.add_argument("--quant_dir", default="configs/quant", help="folder of the <bits>_<method>.yaml configs")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no_mp4", action="store_true", help="do not write .mp4 files (latents and PNGs still are)")
    p.add_argument("--overwrite", action="store_true", help="recompute everything in --outdir")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def settings_from_args(args):
    from t2v.eval.quality import BITS, METHODS, SMALL, BenchSettings

    base = dict(SMALL) if args.small else dict(methods=tuple(METHODS), bits=BITS, num_prompts=10, calib_prompts=10,
                                               num_sampling_steps=None, overrides=())
    chosen = {"methods": args.methods, "bits": args.bits, "num_prompts": args.num_prompts,
              "calib_prompts": args.calib_prompts, "num_sampling_steps": args.num_sampling_steps}
    base.update({k: tuple(v) if isinstance(v, list) else v for k, v in chosen.items() if v is not None})
    if args.overrides is not None:
        base["overrides"] = tuple(base["overrides"]) + tuple(args.overrides)
    outdir = args.outdir or f"logs/quality/{Path(args.config).stem}{'_small' if args.small else ''}"
    return BenchSettings(config=args.config, outdir=Path(outdir), ckpt_path=args.ckpt_path,
                         prompt_path=args.prompt_path, calib_prompt_path=args.calib_prompt_path, seed=args.seed,
                         quant_dir=args.quant_dir, device=args.device, save_mp4=not args.no_mp4,
                         overwrite=args.overwrite, progress=not args.no_progress, **base)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from t2v.eval.quality import BenchmarkError, run_benchmark
    from t2v.eval.quality_report import format_block, format_table, write_block, write_summary_json

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    json_path = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    try:
        settings = settings_from_args(args)
        if settings.save_mp4:
            import imageio_ffmpeg  # noqa: F401  (fail before the slow part, not at the first .mp4)
        summary = run_benchmark(settings)
        write_summary_json(summary, json_path)
        write_block(format_block(summary, args.title, args.note, str(json_path)), args.out)
    except ImportError as exc:
        print(f"error: {exc} (imageio-ffmpeg writes the .mp4 files: pip install imageio-ffmpeg, or pass --no_mp4)"
              if "imageio_ffmpeg" in str(exc) else f"error: {exc}", file=sys.stderr)
        return 2
    except (BenchmarkError, ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary), end="")
    logging.getLogger("bench.quality").info("table in %s, numbers in %s, runs in %s", args.out, json_path,
                                            settings.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
