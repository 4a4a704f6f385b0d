"""shell_scripts/run_pipeline.sh --preset tiny runs all stages and ends with the FP-vs-quantized table."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_run_pipeline_tiny(tmp_path):
    env = {**os.environ, "RUN": str(tmp_path / "run"), "METHODS": "w4a6_qvdit", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", "shell_scripts/run_pipeline.sh", "--preset", "tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "run" / "comparison.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| w4a6_qvdit"))
    _, name, videos, rel_err, psnr, _ = row.split("|")
    assert int(videos) == 3
    assert 0 < float(rel_err) < 0.1  # quantized, but close to FP
    assert 25 < float(psnr) < 100
    assert len(list((tmp_path / "run" / "w4a6_qvdit" / "videos").glob("*.mp4"))) == 3
    assert re.search(r"quant_params\.safetensors", proc.stdout + proc.stderr)


def test_run_pipeline_rejects_unknown_preset():
    proc = subprocess.run(["bash", "shell_scripts/run_pipeline.sh", "--preset", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown preset" in proc.stderr
