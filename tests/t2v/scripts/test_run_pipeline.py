"""shell_scripts/run_pipeline.sh runs all stages and ends with the FP-vs-quantized table: `--preset tiny` on the
shipped shapes model (its FP videos follow their captions), `--preset tiny-random` on a random tiny model."""
import os
import re
import subprocess
import sys
from pathlib import Path

from t2v.data.checker import check_video
from t2v.pipeline.video_io import read_video

REPO = Path(__file__).resolve().parents[3]


def run_pipeline(preset: str, method: str, run: Path) -> tuple[subprocess.CompletedProcess, tuple[int, float, float]]:
    env = {**os.environ, "RUN": str(run), "METHODS": method,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", "shell_scripts/run_pipeline.sh", "--preset", preset], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in (run / "comparison.md").read_text().splitlines() if line.startswith(f"| {method}"))
    _, _, videos, rel_err, psnr, _ = row.split("|")
    assert len(list((run / method / "videos").glob("*.mp4"))) == int(videos) == 3
    assert re.search(r"quant_params\.safetensors", proc.stdout + proc.stderr)
    return proc, (int(videos), float(rel_err), float(psnr))


def test_run_pipeline_tiny_trained_model(tmp_path):
    run = tmp_path / "run"
    _, (_, rel_err, psnr) = run_pipeline("tiny", "w8a8_ptq", run)
    assert 0.01 < rel_err < 0.5 and 15 < psnr < 60  # naive W8A8 PTQ visibly moves a trained model's videos
    captions = (REPO / "configs/prompts/tiny_shapes_heldout.txt").read_text().splitlines()[:3]
    # the FP videos follow their captions (at 20 DDIM steps the soft-edged square can measure closer to the circle
    # prototype: 2 of 3 fully right); naive W8A8 PTQ may damage a shape, but keeps the colours
    fp_videos = sorted((run / "fp").glob("sample_*.mp4"))
    fp = [check_video(read_video(path), caption) for path, caption in zip(fp_videos, captions)]
    assert len(fp) == 3 and all(r["colour"] for r in fp), fp
    assert sum(r["motion"] for r in fp) >= 2 and sum(r["all"] for r in fp) >= 2, fp
    quantized = sorted((run / "w8a8_ptq/videos").glob("sample_*.mp4"))
    assert len(quantized) == 3
    assert all(check_video(read_video(path), caption)["colour"] for path, caption in zip(quantized, captions))


def test_run_pipeline_tiny_random(tmp_path):
    _, (_, rel_err, psnr) = run_pipeline("tiny-random", "w4a6_qvdit", tmp_path / "run")
    assert 0 < rel_err < 0.1  # quantized, but close to FP
    assert 25 < psnr < 100


def test_run_pipeline_rejects_unknown_preset():
    proc = subprocess.run(["bash", "shell_scripts/run_pipeline.sh", "--preset", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown preset" in proc.stderr
