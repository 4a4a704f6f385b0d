"""Stage 4 CLI (t2v.scripts.calib) on the tiny preset."""
import json

import pytest

from t2v.pipeline.calib_data import capture_calib_data
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.sample import build_pipeline
from t2v.pipeline.text_embeds import read_prompts
from t2v.scripts.calib import main

TINY = "configs/opensora/tiny.py"
QUANT = "configs/quant/w4a6_qvdit.yaml"
SETS = ["--set", "calib.n_steps=3", "--set", "calib.n_prompts=1", "--set", "distill.iterations=4",
        "--set", "distill.lr=5e-4", "--set", "distill.checkpoint_every=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    cfg = load_inference_config(TINY)
    pipe = build_pipeline(cfg, num_sampling_steps=3)
    outdir = tmp_path_factory.mktemp("calib_data")
    capture_calib_data(pipe, read_prompts(cfg.prompt_path)[:1], [0], outdir, seed=42, progress=False)
    return outdir


def run(calib_dir, outdir, *extra):
    return main([TINY, "--quant_config", QUANT, "--calib_data", str(calib_dir), "--outdir", str(outdir),
                 "--device", "cpu", "--no_progress", *SETS, *extra])


def test_cli_writes_results_and_resumes(calib_dir, tmp_path, capsys):
    assert run(calib_dir, tmp_path / "out") == 0
    for name in ("quant_params.safetensors", "quant_config.yaml", "inference_config.py", "distill_history.json"):
        assert (tmp_path / "out" / name).is_file()
    report = json.loads((tmp_path / "out" / "distill_history.json").read_text())
    assert len(report["history"]) == 4
    assert run(calib_dir, tmp_path / "out") == 2
    assert "--resume" in capsys.readouterr().err
    assert run(calib_dir, tmp_path / "out", "--resume") == 0
    assert json.loads((tmp_path / "out" / "distill_history.json").read_text())["resumed_from"] == 4
    assert run(calib_dir, tmp_path / "out", "--overwrite") == 0


@pytest.mark.parametrize("change, message", [
    ({"calib_data": "missing"}, "calibration data not found"),
    ({"set": "distill.iters=3"}, "unknown key"),
    ({"set": "calib.n_steps=50"}, "n_steps"),
    ({"ckpt": "missing.safetensors"}, "checkpoint not found"),
    ({"quant": "configs/quant/nope.yaml"}, "not found"),
])
def test_cli_errors_exit_2(calib_dir, tmp_path, capsys, change, message):
    args = [TINY, "--quant_config", change.get("quant", QUANT), "--outdir", str(tmp_path / "out"), "--device", "cpu",
            "--calib_data", str(tmp_path / change["calib_data"]) if "calib_data" in change else str(calib_dir), *SETS]
    if "set" in change:
        args += ["--set", change["set"]]
    if "ckpt" in change:
        args += ["--ckpt_path", str(tmp_path / change["ckpt"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out" / "quant_params.safetensors").exists()
