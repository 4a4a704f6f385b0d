"""checkpoints/tiny_t2v_15min, the model the 15-minute recipe trained (docs/tiny_model.md, session 14): its file
records that recipe, and sampled on the CPU through the normal pipeline (configs/opensora/tiny_trained_15min.py:
IDDPM, 100 steps, CFG 4) its videos of held-out captions follow them."""
from pathlib import Path

from t2v.data import shapes
from t2v.data.checker import check_video
from t2v.models.tiny_t2v import read_tiny_metadata
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.sample import build_pipeline, generate_videos
from t2v.pipeline.video_io import read_video

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "configs/opensora/tiny_trained_15min.py"


def test_the_file_records_the_15_minute_recipe():
    meta = read_tiny_metadata(REPO / "checkpoints/tiny_t2v_15min/model.safetensors")
    recipe = meta["recipe"]
    assert meta["prediction"] == "v" and meta["step"] == 25_000
    assert (recipe["batch_size"], recipe["loss_weighting"], recipe["x0_weight_floor"],
            recipe["x0_weight_floor_final"]) == (128, "min_snr", 1.0, 0.0)
    assert recipe["max_minutes"] <= 16


def test_held_out_videos_follow_their_captions(tmp_path):
    cfg = load_inference_config(CONFIG)
    assert (cfg.scheduler.num_sampling_steps, cfg.scheduler.cfg_scale) == (100, 4.0)
    pipe = build_pipeline(cfg)
    prompts = shapes.heldout_prompts()[:6]
    paths = generate_videos(pipe, prompts, tmp_path, progress=False)
    results = [check_video(read_video(path), prompt) for path, prompt in zip(paths, prompts)]
    assert all(r["colour"] and r["motion"] for r in results), results
    # 81.9% of 72 held-out videos on the GPU; squares now and then measure as circles (the only failures there)
    assert sum(r["all"] for r in results) >= 4, results


def test_eval_tiny_counts_what_the_checker_says(tmp_path, capsys):
    """t2v.scripts.eval_tiny on 2 held-out captions x 2 seeds at 10 steps: its summary is the mean of the checker's
    per-video results, and --out is written once (refused again without --overwrite)."""
    import json

    import torch

    from t2v.models.tiny_t2v import load_tiny_t2v
    from t2v.scripts import eval_tiny

    model = str(REPO / "checkpoints/tiny_t2v_15min/model.safetensors")
    module, _ = load_tiny_t2v(model)
    report = eval_tiny.caption_accuracy(module, shapes.heldout_prompts()[:2], [2, 3], 10, 4.0, torch.device("cpu"))
    flat = [r for per_seed in report["results"] for r in per_seed]
    assert report["videos"] == len(flat) == 4 and len(report["all_per_seed"]) == 2
    for key in ("colour", "shape", "motion", "all"):
        assert report["accuracy_pct"][key] == round(100 * sum(r[key] for r in flat) / 4, 1)
    assert sum(report["all_per_seed"]) == sum(r["all"] for r in flat)
    assert sum(report["shape_seen"].values()) == 4
    out = tmp_path / "eval.json"
    argv = [model, "--num_prompts", "2", "--seeds", "2,3", "--num_sampling_steps", "10", "--device", "cpu",
            "--out", str(out)]
    assert eval_tiny.main(argv) == 0
    written = json.loads(out.read_text())
    assert written["accuracy_pct"] == report["accuracy_pct"] and written["videos"] == 4
    assert eval_tiny.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert eval_tiny.main([str(tmp_path / "missing.safetensors")]) == 2
