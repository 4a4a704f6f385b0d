"""bench/fullsize_pipeline.sh's setup (CPU): the RANDOM-weight stand-ins load with the pipeline's own loaders.

The full-size chain itself needs a GPU; here: the script's --help, its setup at depth 1 (full widths) loaded by
`build_model` / `STDiT.from_pretrained` / the text-embedding reader, the full-depth checkpoint's keys against the
fixture (on the meta device), the random SD VAE, and run_pipeline.sh's overrides on the tiny preset.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from t2v.models.stdit import CONFIG_METADATA_KEY, SINCOS_BUFFERS, STDiT, STDiT_XL_2
from t2v.pipeline.build import build_model, build_vae
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.text_embeds import load_text_embeds, read_prompts, select_prompts
from t2v.scripts import make_random_fullsize as mrf

REPO = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def test_help():
    proc = subprocess.run(["bash", "bench/fullsize_pipeline.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "RANDOM" in proc.stdout and "--setup_only" in proc.stdout
    proc = subprocess.run(["bash", "bench/fullsize_pipeline.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fullsize_random")
    proc = subprocess.run(["bash", "bench/fullsize_pipeline.sh", "--setup_only", "--depth", "1", "--random_dir",
                           str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_setup_files_load_with_the_pipeline_loaders(setup_dir):
    ckpt, embeds_path, config_path = (setup_dir / name for name in (mrf.CKPT_NAME, mrf.EMBEDS_NAME, mrf.CONFIG_NAME))
    cfg = load_inference_config(config_path)
    assert cfg.model["from_pretrained"] == str(ckpt.resolve()) and cfg.vae["type"] == "sd_vae_random"
    assert (cfg.scheduler.sampler, cfg.scheduler.cfg_scale, cfg.dtype) == ("ddim", 4.0, "fp32")  # the Q-VDiT setting
    with safe_open(str(ckpt), framework="pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert not keys & set(SINCOS_BUFFERS) and "RANDOM" in meta["note"]  # the split format stage 1 writes
    assert json.loads(meta[CONFIG_METADATA_KEY])["hidden_size"] == 1152
    model = build_model(cfg, mrf.LATENT_SIZE, ckpt_path=str(ckpt))  # the pipeline's loader (strict)
    assert len(model.blocks) == 1 and model.config["hidden_size"] == 1152 and model.num_spatial == 1024
    again = STDiT.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert any(torch.count_nonzero(p) for p in model.final_layer.parameters())  # not the zero init

    embeds = load_text_embeds(embeds_path)
    prompts = read_prompts(cfg.prompt_path)[:2]
    assert embeds["prompts"] == prompts and "RANDOM" in embeds["encoder"]
    rows = select_prompts(embeds, prompts)
    assert rows["y"].shape == (2, 1, 120, 4096) and rows["mask"].shape == (2, 120)
    assert [int(n) for n in rows["mask"].sum(1)] == [mrf.token_count(p) for p in prompts]
    assert torch.equal(embeds["y_null"][0, 0], model.y_embedder.y_embedding)


def test_full_depth_checkpoint_matches_the_fixture_keys(fixtures_dir):
    """The depth-28 checkpoint the script writes has exactly STDiT-XL/2's split keys and shapes (built on meta)."""
    cfg = mrf.random_config(None)
    assert cfg.model["type"] == "STDiT-XL/2" and "depth" not in cfg.model
    keys = json.loads((fixtures_dir / "stdit_xl2_keys.json").read_text())
    with torch.device("meta"):
        model = STDiT_XL_2(input_size=mrf.LATENT_SIZE, space_scale=cfg.model["space_scale"],
                           time_scale=cfg.model["time_scale"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: v["shape"] for k, v in keys["split"].items()}
    assert sum(p.numel() for p in model.parameters()) == keys["split_num_parameters"] == 759_620_768


def test_random_sd_vae():
    cfg = mrf.random_config(None)
    vae = build_vae(cfg)
    assert vae.downsample_factor == 8 and vae.out_channels == 4 and vae.micro_batch_size == 128
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # stabilityai/sd-vae-ft-ema's size
    video = vae.decode(torch.randn(1, 4, 2, 4, 4))
    assert video.shape == (1, 3, 2, 32, 32) and torch.isfinite(video).all()
    with pytest.raises(ValueError, match="sd_vae_random"):
        build_vae(cfg.replace(vae={"type": "sd_vae_random", "from_pretrained": "x"}))


@pytest.mark.slow
def test_run_pipeline_overrides_on_the_tiny_preset(tmp_path):
    """CFG, NUM_PROMPTS, SAMPLING_STEPS and DISTILL_ITERS reach every stage; --text_embeds reaches the sampling
    stages only (stage 4 has no such flag: the embeddings are in the calibration data)."""
    embeds = tmp_path / "embeds.safetensors"
    proc = subprocess.run([sys.executable, "-m", "t2v.scripts.encode_prompts", "configs/opensora/tiny_qvdit.py",
                           "--out", str(embeds), "--device", "cpu"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**ENV, "RUN": str(tmp_path / "run"), "METHODS": "w4a6_qvdit", "CFG": "configs/opensora/tiny_qvdit.py",
           "NUM_PROMPTS": "1", "SAMPLING_STEPS": "3", "DISTILL_ITERS": "2"}
    proc = subprocess.run(["bash", "shell_scripts/run_pipeline.sh", "--preset", "tiny-random", "--text_embeds", str(embeds)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    index = json.loads((run / "calib_data" / "index.json").read_text())
    assert len(index["prompts"]) == 1 and len(index["timesteps"]) == 3
    history = json.loads((run / "w4a6_qvdit" / "distill_history.json").read_text())
    assert len(history["history"]) == 2
    assert len(list((run / "fp").glob("*.mp4"))) == 1 and len(list((run / "w4a6_qvdit" / "videos").glob("*.mp4"))) == 1
    assert "| w4a6_qvdit" in (run / "comparison.md").read_text()
    assert "== [" in proc.stdout  # stage start times
