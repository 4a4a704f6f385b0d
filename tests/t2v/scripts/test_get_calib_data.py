"""Stage 3 CLI: plain and under torchrun (2 CPU processes, gloo) give the same calibration data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2v.pipeline.calib_data import CalibDataset
from t2v.scripts.get_calib_data import main

REPO = Path(__file__).resolve().parents[3]
ARGS = ["configs/opensora/tiny.py", "--num_sampling_steps", "3", "--data_num", "3", "--device", "cpu"]


def test_torchrun_matches_a_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([*ARGS, "--outdir", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "t2v.scripts.get_calib_data", *ARGS, "--outdir", str(multi)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "index.json").read_text()) for d in (single, multi))
    for key in ("prompts", "shards", "timesteps", "latent_shape", "text_shape", "config"):
        assert a[key] == b[key], key
    assert len(b["shards"]) == 3
    for shard in a["shards"]:
        x_single, x_multi = (load_file(d / shard["file"])["x"] for d in (single, multi))
        assert torch.equal(x_single, x_multi)
    assert len(CalibDataset(multi)) == 3 * 3 * 2


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*ARGS, "--num_prompts", "2", "--outdir", str(tmp_path)])
    assert exc.value.code == 2 and "disagree" in capsys.readouterr().err
    assert main([*ARGS[:1], "--prompt_path", str(tmp_path / "none.txt"), "--outdir", str(tmp_path / "o")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
