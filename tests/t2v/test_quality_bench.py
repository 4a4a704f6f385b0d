"""bench/quality.py --small on the tiny preset: sane numbers, a table that matches its JSON, resume, refusals;
and the report/checker helpers of t2v.eval.quality and t2v.eval.quality_report."""
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2v.eval.metrics import have_cv2
from t2v.eval.quality import SMALL, BenchmarkError, checker_scores, split_prompts
from t2v.eval.quality_report import (COLUMNS, END, START, bit_width, format_table, format_value, write_block,
                                     write_summary_json)

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench_cli", REPO / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    argv = ["--small", "--outdir", str(root / "run"), "--out", str(root / "quality.md"), "--no_progress"]
    assert load_bench().main(argv) == 0
    return root, argv


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip().strip("*") for cell in row.strip("|").split("|")] for row in rows[1:]]  # no header


def test_small_run_numbers(small_run):
    root, _ = small_run
    summary = json.loads((root / "quality.json").read_text())
    assert summary == json.loads((root / "run" / "quality.json").read_text())
    names = [f"{b}_{m}" for b in SMALL["bits"] for m in SMALL["methods"]]
    assert [r["name"] for r in summary["runs"]] == names
    assert summary["settings"]["num_sampling_steps"] == SMALL["num_sampling_steps"]
    assert len(summary["settings"]["evaluation_prompts"]) == SMALL["num_prompts"]
    assert summary["environment"]["torch"] == torch.__version__
    fp = summary["fp"]["metrics"]
    assert fp["psnr"] == math.inf and fp["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert fp["temporal_error"] == 0.0 and fp["latent_rel_error"] == 0.0
    if have_cv2():
        assert fp["flow_epe"] == 0.0 and fp["delta_flow"] == 0.0
    for run in summary["runs"]:
        m = run["metrics"]
        assert math.isfinite(m["psnr"]) and m["psnr"] > 10, run["name"]  # quantized: not identical, not noise
        assert -1 <= m["ssim"] <= 1 and 0 <= m["temporal_error"] < math.inf
        assert 0 < m["latent_rel_error"] < 1
        assert m["checker_accuracy"] is None or 0 <= m["checker_accuracy"] <= 1
        assert len(run["per_video"]) == SMALL["num_prompts"]
        assert len(list((root / "run" / run["name"] / "videos").glob("*.mp4"))) == SMALL["num_prompts"]
        assert (root / "run" / run["name"] / "quant_params.safetensors").is_file()
        assert run["quant_config"]["calib"]["n_steps"] <= SMALL["num_sampling_steps"]
    qvdit = next(r for r in summary["runs"] if r["name"] == "w3a6_qvdit")
    assert qvdit["quant_config"]["distill"]["iterations"] == 20  # --small's distillation
    # evaluation prompts are held out from calibration
    evaluation = {i for i, _ in summary["settings"]["evaluation_prompts"]}
    assert not evaluation & {i for i, _ in summary["settings"]["calibration_prompts"]}


def test_markdown_matches_json(small_run):
    root, _ = small_run
    summary = json.loads((root / "quality.json").read_text())
    text = (root / "quality.md").read_text()
    assert text.startswith(START) and text.rstrip().endswith(END)
    rows = table_rows(text)
    results = [summary["fp"], *summary["runs"]]
    assert len(rows) == len(results)
    for row, result in zip(rows, results):
        assert row[0] == result["method_label"]
        for cell, (key, _, digits, _) in zip(row[2:], COLUMNS):
            assert cell == format_value(result["metrics"][key], digits, percent=key == "checker_accuracy"), key
    assert [r[1] for r in rows[1:]] == ["8/8"] * 3 + ["3/6"] * 3


def test_resume_skips_done_runs(small_run, caplog):
    root, argv = small_run
    results = sorted((root / "run").glob("*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    params = [p.stat().st_mtime_ns for p in (root / "run").glob("*/quant_params.safetensors")]
    with caplog.at_level(logging.INFO):
        assert load_bench().main(argv) == 0
    assert sum("done before, skipped" in r.getMessage() for r in caplog.records) == len(results) - 1  # not fp
    assert [p.stat().st_mtime_ns for p in results[1:]] == stamps[1:]  # results[0] is fp/result.json (rescored)
    assert [p.stat().st_mtime_ns for p in (root / "run").glob("*/quant_params.safetensors")] == params


def test_other_settings_are_refused(small_run, capsys):
    root, argv = small_run
    assert load_bench().main(argv + ["--num_prompts", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert load_bench().main(argv + ["--set", "distill.iterations=3"]) == 2
    assert "another quant config" in capsys.readouterr().err


def test_help_and_bad_selection(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "bench/quality.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0 and "--small" in proc.stdout and "--methods" in proc.stdout
    argv = ["--outdir", str(tmp_path / "run"), "--out", str(tmp_path / "q.md"), "--no_progress"]
    assert load_bench().main(argv + ["--bits", "w5a5", "--methods", "ptq", "--num_prompts", "1", "--calib_prompts", "1"]) == 2
    assert "no quant config" in capsys.readouterr().err
    assert load_bench().main(argv + ["--num_prompts", "3", "--calib_prompts", "1"]) == 2  # the file has 3 prompts
    assert "needs 4 lines" in capsys.readouterr().err


def test_split_prompts():
    lines = [f"p{i}" for i in range(6)]
    evaluation, calib = split_prompts(lines, lines, True, 3, 2)
    assert calib == [(0, "p0"), (1, "p1")] and evaluation == [(2, "p2"), (3, "p3"), (4, "p4")]
    evaluation, calib = split_prompts(lines, ["c0", "c1"], False, 2, 2)
    assert evaluation == [(0, "p0"), (1, "p1")] and calib == [(0, "c0"), (1, "c1")]
    with pytest.raises(BenchmarkError, match="calibration prompts"):
        split_prompts(lines, ["c0"], False, 2, 2)


def test_checker_scores():
    videos = [torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.full((2, 4, 4, 3), 255, dtype=torch.uint8),
              torch.zeros(2, 4, 4, 3, dtype=torch.uint8)]
    prompts = ["a dark square", "a bright square", "not a shapes caption"]

    def parse_caption(caption):
        if "square" not in caption:
            raise ValueError("not a caption of the grammar")
        return caption

    def check_video(video, caption):  # "passes" when the brightness matches the caption
        bright = bool(video.float().mean() > 127)
        colour = bright == ("bright" in caption)
        return {"colour": colour, "shape": True, "motion": False, "all": colour}

    scores = checker_scores(videos, prompts, (check_video, parse_caption))
    assert scores["accuracy"] == 1.0 and scores["checked"] == 2 and scores["passed"] == 2
    assert scores["per_key"] == {"all": 1.0, "colour": 1.0, "motion": 0.0, "shape": 1.0}
    assert scores["per_video"][2] is None
    swapped = checker_scores([videos[1], videos[1]], prompts[:2], (check_video, parse_caption))  # dark one fails
    assert swapped["accuracy"] == 0.5
    none = checker_scores(videos, prompts, None)
    assert none["accuracy"] is None and none["checked"] == 0


def test_table_groups_by_bit_width_and_bolds_the_best():
    def row(label, bits, psnr, ssim):
        metrics = {key: None for key, *_ in COLUMNS}
        metrics.update(psnr=psnr, ssim=ssim)
        return {"method_label": label, "bits": bits, "metrics": metrics}

    summary = {"fp": {**row("FP", None, math.inf, 1.0), "dtype": "fp16"},
               "runs": [row("Naive PTQ", "w4a8", 30.0, 0.91), row("Q-VDiT", "w4a8", 35.5, 0.91),
                        row("Naive PTQ", "w3a6", 20.0, 0.80), row("Q-VDiT", "w3a6", 19.0, 0.8000001)]}
    rows = format_table(summary).splitlines()[2:]
    assert rows[0] == "| FP | 16/16 | inf | 1.0000 | " + " | ".join(["n/a"] * 5) + " |"  # one row: no bold
    assert rows[1].startswith("| Naive PTQ | 4/8 | 30.00 | **0.9100** |")  # equal printed values: both bold
    assert rows[2].startswith("| Q-VDiT | 4/8 | **35.50** | **0.9100** |")
    assert rows[3].startswith("| Naive PTQ | 3/6 | **20.00** | **0.8000** |")
    assert rows[4].startswith("| Q-VDiT | 3/6 | 19.00 | **0.8000** |")
    assert bit_width("w8a8") == "8/8" and bit_width(None, "fp32") == "32/32"


def test_write_block_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "doc.md"
    block = f"{START}\ntable one\n{END}\n"
    write_block(block, path)
    assert path.read_text() == block
    path.write_text(f"# Title\n\nintro\n\n{START}\nold\n{END}\n\nfooter\n")
    write_block(f"{START}\nnew table\n{END}\n", path)
    assert path.read_text() == f"# Title\n\nintro\n\n{START}\nnew table\n{END}\n\nfooter\n"
    plain = tmp_path / "notes.md"
    plain.write_text("my notes\n")
    with pytest.raises(FileExistsError, match="no <!-- quality-benchmark:start -->"):
        write_block(block, plain)
    assert plain.read_text() == "my notes\n"


def test_summary_json_replaces_only_its_own_files(tmp_path):
    summary = {"format": "qvdit-quality-benchmark", "runs": []}
    path = write_summary_json(summary, tmp_path / "q.json")
    write_summary_json({**summary, "runs": [1]}, path)
    assert json.loads(path.read_text())["runs"] == [1]
    foreign = tmp_path / "other.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="not a quality-benchmark summary"):
        write_summary_json(summary, foreign)
