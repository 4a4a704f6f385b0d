"""Compare quantized runs with the FP run: relative latent error and PSNR of the decoded videos.

    python -m t2v.scripts.compare_videos logs/qvdit_fp_inference logs/calib/w8a8_viditq/videos \
        logs/calib/w4a8_qvdit/videos --out logs/compare.md
"""
from __future__ import annotations

import argparse
import sys

from t2v.scripts._common import fail


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fp_dir", help="the FP run's video folder (stage 2)")
    p.add_argument("run_dirs", nargs="+", help="quantized runs' video folders (stage 5), same file names")
    p.add_argument("--names", nargs="+", default=None, help="row labels for the runs (default: their paths)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from t2v.pipeline.compare import compare_runs, format_table, write_table

    try:
        table = format_table(compare_runs(args.fp_dir, args.run_dirs, args.names))
        if args.out:
            write_table(table, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        return fail(exc)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
