"""The README's animation: FP videos over quantized ones, side by side, from a `run_pipeline.sh` run folder.

    python bench/readme_gif.py RUN [--method w8a8_ptq] [--out imgs/tiny_fp_vs_quant.gif]

Reads RUN/fp/sample_*.mp4 (top row) and RUN/METHOD/videos/sample_*.mp4 (bottom row), first three of each,
upscales each frame 4x (nearest) with an 8-pixel border, and writes a looping GIF (120 ms per frame).
Refuses to overwrite --out unless --overwrite is given.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tile(video: np.ndarray, scale: int = 4, border: int = 8) -> np.ndarray:
    """[T, H, W, 3] uint8 -> [T, H·scale + 2·border, W·scale + 2·border, 3] (nearest upscale, black border)."""
    big = video.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.pad(big, ((0, 0), (border, border), (border, border), (0, 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run_pipeline.sh output folder (RUN=...)")
    parser.add_argument("--method", default="w8a8_ptq", help="the quantized run shown in the bottom row")
    parser.add_argument("--count", type=int, default=3, help="videos per row")
    parser.add_argument("--out", default="imgs/tiny_fp_vs_quant.gif")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    import imageio.v3 as iio

    from t2v.pipeline.video_io import read_video

    run, out = Path(args.run), Path(args.out)
    if out.exists() and not args.overwrite:
        sys.exit(f"{out} exists: pass --overwrite to replace it")
    rows = []
    for folder in (run / "fp", run / args.method / "videos"):
        paths = sorted(folder.glob("sample_*.mp4"))[:args.count]
        if len(paths) < args.count:
            sys.exit(f"{folder}: expected {args.count} sample_*.mp4 videos, found {len(paths)}")
        videos = [read_video(path).numpy() for path in paths]  # uint8 [T, H, W, 3] each
        rows.append(np.concatenate([tile(v) for v in videos], axis=2))
    frames = np.concatenate(rows, axis=1)  # [T, 2·tile_h, count·tile_w, 3]
    tmp = out.with_name(f".{out.name}.tmp")
    iio.imwrite(tmp, frames, extension=".gif", duration=120, loop=0)
    tmp.replace(out)
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")


if __name__ == "__main__":
    main()
