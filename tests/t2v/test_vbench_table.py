"""t2v.eval.vbench_table / vbench_run and t2v.scripts.eval_vbench, without the vbench package."""
import importlib.util
import json
import os

import pytest

from t2v.eval import vbench_run
from t2v.eval.vbench_table import (DIMENSION_NAMES, format_vbench_table, parse_results, run_label, run_name,
                                   split_dimensions, staged_names, to_percent)
from t2v.scripts import eval_vbench

HAVE_VBENCH = importlib.util.find_spec("vbench") is not None
# ViDiT-Q's W8A8 row of its Table 1 (OpenSora v1.0), as VBench's [0, 1] scores
VIDITQ_W8A8 = {"imaging_quality": 0.6348, "aesthetic_quality": 0.5695, "motion_smoothness": 0.9614,
               "dynamic_degree": 0.6111, "background_consistency": 0.9584, "subject_consistency": 0.9024,
               "scene": 0.3822, "overall_consistency": 0.2606}


def vbench_json(scores: dict) -> dict:
    """VBench's results file layout: {dimension: [score, [per-video results]]}."""
    return {d: [s, [{"video_path": "x.mp4", "video_results": s}]] for d, s in scores.items()}


def test_parse_results():
    assert parse_results(vbench_json({"scene": 0.25, "dynamic_degree": 1})) == {"scene": 0.25, "dynamic_degree": 1.0}
    assert parse_results({"imaging_quality": 63.5}) == {"imaging_quality": 63.5}
    for bad in ({"scene": ["x", []]}, {"scene": True}, {"scene": []}, [0.5]):
        with pytest.raises(ValueError):
            parse_results(bad)


def test_percent_and_labels():
    assert to_percent(0.6368) == pytest.approx(63.68)
    assert to_percent(63.68) == 63.68  # VBench < 0.1.5 imaging quality: already 0-100
    assert run_label("fp") == ("FP", "16/16")
    assert run_label("w4a6_qvdit") == ("Q-VDiT", "4/6")
    assert run_label("w8a8_ptq") == ("Naive PTQ", "8/8")
    assert run_label("w3a6_viditq") == ("ViDiT-Q", "3/6")
    assert run_label("my_run") == ("my_run", "-")
    assert run_label("fp", "32/32") == ("FP", "32/32")


def test_table_in_the_papers_layout():
    table = format_vbench_table([("w8a8_viditq", VIDITQ_W8A8), ("fp", {"scene": 0.3961})])
    header, rule, viditq, fp = table.splitlines()
    assert header == ("| Method | W/A | Imaging Quality | Aesthetic Quality | Motion Smooth. | Dynamic Degree | "
                      "BG. Consist. | Subject Consist. | Scene Consist. | Overall Consist. |")
    assert rule == "|---|---|" + "---:|" * 8
    assert viditq == "| ViDiT-Q | 8/8 | 63.48 | 56.95 | 96.14 | 61.11 | 95.84 | 90.24 | 38.22 | 26.06 |"
    assert fp == "| FP | 16/16 | " + " | ".join(["n/a"] * 6 + ["39.61", "n/a"]) + " |"
    two = format_vbench_table([("w8a8_viditq", VIDITQ_W8A8)], ("scene", "imaging_quality"))
    assert two.splitlines()[2] == "| ViDiT-Q | 8/8 | 38.22 | 63.48 |"
    assert list(DIMENSION_NAMES) == list(VIDITQ_W8A8)


def test_custom_prompts_cannot_score_scene():
    assert split_dimensions(list(DIMENSION_NAMES), "custom_input") == (
        [d for d in DIMENSION_NAMES if d != "scene"], ["scene"])
    assert split_dimensions(["scene"], "vbench_standard") == (["scene"], [])


def test_staged_names():
    names = ["sample_0002_a_cat.mp4", "sample_0000_a_dog.mp4", "sample_0001_a_dog.mp4"]
    prompts = {0: "a dog", 1: "a dog", 2: "a cat"}
    assert staged_names(names, prompts) == {"sample_0000_a_dog.mp4": "a dog-0.mp4",
                                            "sample_0001_a_dog.mp4": "a dog-1.mp4",
                                            "sample_0002_a_cat.mp4": "a cat-0.mp4"}
    with pytest.raises(ValueError, match="not a pipeline video name"):
        staged_names(["clip.mp4"], prompts)
    with pytest.raises(ValueError, match="prompt index 7"):
        staged_names(["sample_0007_x.mp4"], prompts)
    with pytest.raises(ValueError, match="cannot be a file name"):
        staged_names(["sample_0000_x.mp4"], {0: "red/blue"})
    assert run_name("logs/q/w4a6_qvdit/videos") == "w4a6_qvdit"
    assert run_name("logs/q/fp") == "fp"


def make_videos(folder, names):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
        (folder / name.replace(".mp4", ".png")).write_bytes(b"png")  # contact sheets must not be staged
    return folder


def test_stage_videos(tmp_path):
    source = make_videos(tmp_path / "run", ["sample_0000_a.mp4", "sample_0001_b.mp4"])
    staged = vbench_run.stage_videos(source, {0: "a red circle", 1: "a blue square"}, tmp_path / "staged")
    assert sorted(os.listdir(staged)) == ["a blue square-0.mp4", "a red circle-0.mp4"]
    assert (staged / "a red circle-0.mp4").read_bytes() == b"sample_0000_a.mp4"
    staged = vbench_run.stage_videos(source, {0: "x", 1: "y"}, tmp_path / "staged")  # restaged from scratch
    assert sorted(os.listdir(staged)) == ["x-0.mp4", "y-0.mp4"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .mp4"):
        vbench_run.stage_videos((tmp_path / "empty").resolve(), {}, tmp_path / "s2")


class FakeVBench:
    """Stands in for vbench.VBench: records the calls and writes results in VBench's file layout."""
    calls = []

    def __init__(self, device, full_info_dir, output_path):
        self.output_path = output_path

    def evaluate(self, videos_path, name, dimension_list, local, mode):
        FakeVBench.calls.append((name, sorted(os.listdir(videos_path)), list(dimension_list), mode))
        scores = {d: 0.5 + 0.01 * i for i, d in enumerate(dimension_list)}
        with open(os.path.join(self.output_path, f"{name}_eval_results.json"), "w") as f:
            json.dump(vbench_json(scores), f)


def test_evaluate_runs_stages_scores_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(vbench_run, "import_vbench", lambda: FakeVBench)
    FakeVBench.calls = []
    runs = {"fp": str(make_videos(tmp_path / "fp", ["sample_0000_a.mp4"])),
            "w4a6_qvdit": str(make_videos(tmp_path / "q" / "videos", ["sample_0000_a.mp4"]))}
    out = tmp_path / "vbench"
    results = vbench_run.evaluate_runs(runs, {0: "a red circle"}, out, list(DIMENSION_NAMES), device="cpu")
    assert [c[0] for c in FakeVBench.calls] == ["fp", "w4a6_qvdit"]
    assert FakeVBench.calls[0][1] == ["a red circle-0.mp4"] and FakeVBench.calls[0][3] == "custom_input"
    assert "scene" not in FakeVBench.calls[0][2]
    assert results["fp"]["imaging_quality"] == 0.5 and "scene" not in results["fp"]
    again = vbench_run.evaluate_runs(runs, {0: "a red circle"}, out, list(DIMENSION_NAMES), device="cpu")
    assert again == results and len(FakeVBench.calls) == 2  # scored runs are not scored again
    with pytest.raises(FileNotFoundError, match="VBench_full_info.json"):
        vbench_run.evaluate_runs(runs, {0: "a"}, out, ["scene"], mode="vbench_standard", full_info=str(tmp_path / "no"),
                                 overwrite=True)


def test_cli_formats_existing_results_without_vbench(tmp_path, capsys):
    bench = tmp_path / "bench"
    (bench / "fp").mkdir(parents=True)
    recorded = {"evaluation_prompts": [[1, "a red circle"]], "config": {"dtype": "fp32"}}
    (bench / "run.json").write_text(json.dumps(recorded))
    for name in ("w3a6_qvdit", "w8a8_ptq", "w8a8_qvdit"):
        make_videos(bench / name / "videos", ["sample_0001_a.mp4"])
    out = tmp_path / "vbench"
    out.mkdir()
    for i, name in enumerate(("fp", "w8a8_ptq", "w8a8_qvdit", "w3a6_qvdit")):
        (out / f"{name}_eval_results.json").write_text(json.dumps(vbench_json({"imaging_quality": 0.6 - i / 100})))
    assert eval_vbench.main(["--bench_dir", str(bench), "--outdir", str(out), "--dimensions", "imaging_quality"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[2:] == ["| FP | 32/32 | 60.00 |", "| Naive PTQ | 8/8 | 59.00 |",
                                        "| Q-VDiT | 8/8 | 58.00 |", "| Q-VDiT | 3/6 | 57.00 |"]
    assert (out / "vbench.md").read_text() == printed
    assert eval_vbench.main(["--bench_dir", str(bench), "--outdir", str(out), "--out", str(out / "vbench.md"),
                             "--dimensions", "imaging_quality"]) == 2  # an explicit --out is not replaced silently
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_VBENCH, reason="vbench is installed here")
def test_cli_says_how_to_install_vbench(tmp_path, capsys):
    videos = make_videos(tmp_path / "w4a8_qvdit" / "videos", ["sample_0000_a.mp4"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert eval_vbench.main([str(videos), "--prompt_path", str(prompts), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install vbench" in err and "VBENCH_CACHE_DIR" in err


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        eval_vbench.parse_args([])  # neither folders nor --bench_dir
    with pytest.raises(SystemExit):
        eval_vbench.parse_args(["logs/x"])  # folders need --prompt_path
