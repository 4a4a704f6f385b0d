"""VBench on generated video folders, printed as the papers' table (method rows x VBench dimensions, percent).

    python -m t2v.scripts.eval_vbench --bench_dir logs/quality/tiny_trained_qvdit      # a bench/quality.py run
    python -m t2v.scripts.eval_vbench logs/qvdit_fp_inference logs/calib/w4a8_qvdit/videos \
        --prompt_path configs/prompts/t2v_samples_10.txt --outdir logs/vbench/opensora

Dimensions (default, the papers'): imaging_quality aesthetic_quality motion_smoothness dynamic_degree
background_consistency subject_consistency scene overall_consistency. With our own prompts VBench runs in
`custom_input` mode, where it cannot score `scene` (it needs the labels of VBench's prompt suite: generate
VBench's prompts and pass --mode vbench_standard for that column). Results go to
<outdir>/<run>_eval_results.json (VBench's format; a run already scored is not scored again unless
--overwrite) and the table to --out. Needs the `vbench` package and its weights only for runs not yet scored.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from t2v.scripts._common import fail, setup_logging


def parse_args(argv=None):
    from t2v.eval.vbench_table import DIMENSION_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video_dirs", nargs="*", help="video folders (stage 2/5 outputs: sample_<index>_<slug>.mp4)")
    p.add_argument("--bench_dir", default=None, help="a bench/quality.py run folder: scores fp/ and every <run>/videos/ "
                   "with the prompts recorded in its run.json")
    p.add_argument("--names", nargs="+", default=None, help="row names of video_dirs (default: folder names; "
                   "'<bits>_<method>' such as w4a6_qvdit and 'fp' get the papers' labels)")
    p.add_argument("--prompt_path", default=None, help="the prompt file the videos were generated from")
    p.add_argument("--dimensions", nargs="+", default=list(DIMENSION_NAMES), help="VBench dimensions (default: the papers')")
    p.add_argument("--mode", choices=("custom_input", "vbench_standard"), default="custom_input",
                   help="custom_input: any prompts; vbench_standard: videos of VBench's own prompt suite")
    p.add_argument("--full_info", default=None, help="VBench_full_info.json for vbench_standard (default: vbench's own)")
    p.add_argument("--outdir", default="logs/vbench", help="VBench results folder")
    p.add_argument("--out", default=None, help="markdown table (default <outdir>/vbench.md)")
    p.add_argument("--fp_bits", default=None, help="W/A shown for the 'fp' row (default: from --bench_dir's dtype, "
                   "else 16/16 as the papers' FP16)")
    p.add_argument("--device", default="cuda", help="device VBench runs on (default cuda)")
    p.add_argument("--local", action="store_true", help="VBench's local mode: use the weights in $VBENCH_CACHE_DIR")
    p.add_argument("--overwrite", action="store_true", help="score runs again and replace an existing --out")
    args = p.parse_args(argv)
    if bool(args.video_dirs) == bool(args.bench_dir):
        p.error("pass video folders (with --prompt_path) or --bench_dir, not both")
    if args.video_dirs and not args.prompt_path:
        p.error("video folders need --prompt_path (the prompt of sample_<index>_... is line <index> of it)")
    if args.names and len(args.names) != len(args.video_dirs):
        p.error(f"{len(args.names)} --names for {len(args.video_dirs)} video folders")
    return args


def bench_runs(bench_dir: Path) -> tuple[dict[str, str], dict[int, str], str]:
    """A bench/quality.py folder -> ({run name: video folder} FP first then by bits, {prompt index: prompt},
    the FP row's W/A)."""
    from t2v.eval.quality import BITS, METHODS, RUN_NAME
    from t2v.eval.quality_report import bit_width

    run_file = bench_dir / RUN_NAME
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file} not found: --bench_dir takes a folder written by bench/quality.py")
    recorded = json.loads(run_file.read_text(encoding="utf-8"))
    prompts = {int(i): p for i, p in recorded["evaluation_prompts"]}
    fp_bits = bit_width(None, recorded.get("config", {}).get("dtype"))
    runs = {"fp": str(bench_dir / "fp")}

    def order(path: Path):
        bits, _, method = path.parent.name.partition("_")
        return (BITS.index(bits) if bits in BITS else len(BITS), list(METHODS).index(method) if method in METHODS
                else len(METHODS), path.parent.name)

    for videos in sorted(bench_dir.glob("*/videos"), key=order):
        runs[videos.parent.name] = str(videos)
    return runs, prompts, fp_bits


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from t2v.eval.vbench_run import VBenchMissingError, evaluate_runs
    from t2v.eval.vbench_table import format_vbench_table, run_name
    from t2v.pipeline.compare import write_table
    from t2v.pipeline.text_embeds import read_prompts

    try:
        fp_bits = "16/16"
        if args.bench_dir:
            runs, prompts, fp_bits = bench_runs(Path(args.bench_dir))
        else:
            names = args.names or [run_name(d) for d in args.video_dirs]
            if len(set(names)) != len(names):
                raise ValueError(f"run names repeat ({names}); pass --names")
            runs, prompts = dict(zip(names, args.video_dirs)), dict(enumerate(read_prompts(args.prompt_path)))
        results = evaluate_runs(runs, prompts, args.outdir, args.dimensions, mode=args.mode, full_info=args.full_info,
                                device=args.device, local=args.local, overwrite=args.overwrite)
        table = format_vbench_table(list(results.items()), tuple(args.dimensions), args.fp_bits or fp_bits)
        out = Path(args.out) if args.out else Path(args.outdir) / "vbench.md"
        write_table(table, out, overwrite=args.overwrite or args.out is None)
    except VBenchMissingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        return fail(exc)
    print(table, end="")
    logging.getLogger("t2v").info("VBench results in %s, table in %s", args.outdir, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
