"""Stage 3 capture and the stage-4 loader on the tiny preset (2 prompts, 5 sampling steps)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from t2v.pipeline.calib_data import (
    CalibDataError,
    CalibDataset,
    capture_calib_data,
    shard_name,
    subsample_steps,
)
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.sample import build_pipeline, encode_text, initial_noise

PROMPTS = ["a red circle moving right on a blue background", "a small green square moving up"]
SEED = 42
STEPS = 5


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(load_inference_config("configs/opensora/tiny.py"), num_sampling_steps=STEPS)


@pytest.fixture(scope="module")
def calib_dir(pipe, tmp_path_factory):
    """bf16 capture (the default) of both prompts."""
    out = tmp_path_factory.mktemp("calib") / "data"
    return capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def calib_dir_fp32(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib32") / "data"
    return capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED, x_dtype="float32", progress=False)


def test_shard_shapes_and_index(pipe, calib_dir):
    shard = load_file(calib_dir / "prompt_0000.safetensors")
    assert shard["x"].shape == (STEPS, 2, 4, 4, 16, 16) and shard["x"].dtype == torch.bfloat16
    assert shard["timestep"].shape == (STEPS,) and shard["timestep"].dtype == torch.int64
    assert shard["y"].shape == (2, 1, 8, 32) and shard["y"].dtype == torch.float32
    assert shard["mask"].shape == (2, 8) and shard["mask"].dtype == torch.int64
    index = json.loads((calib_dir / "index.json").read_text())
    assert index["format"] == "qvdit-calib-data" and index["version"] == 1
    assert index["num_sampling_steps"] == STEPS and index["prompts"] == PROMPTS
    assert index["shards"] == [{"file": "prompt_0000.safetensors", "prompt_index": 0},
                               {"file": "prompt_0001.safetensors", "prompt_index": 1}]
    assert index["x_dtype"] == "bfloat16" and index["latent_shape"] == [4, 4, 16, 16] and index["text_shape"] == [8, 32]
    assert index["config"]["scheduler"]["num_sampling_steps"] == STEPS  # the override, resolved
    assert "created" in index and index["ckpt_path"] is None
    # Sampling order: the sampler walks its (ascending) timestep map backwards.
    expected = pipe.sampler.timestep_map.flip(0).tolist()
    assert index["timesteps"] == expected and shard["timestep"].tolist() == expected


def test_stored_inputs_are_what_the_model_received(pipe, calib_dir, calib_dir_fp32):
    for i, prompt in enumerate(PROMPTS):
        shard = load_file(calib_dir_fp32 / shard_name(i))
        noise = initial_noise(pipe, SEED, [i])[0]
        assert torch.equal(shard["x"][0, 0], noise) and torch.equal(shard["x"][0, 1], noise)
        assert torch.equal(shard["x"][:, 0], shard["x"][:, 1])  # cond state duplicated at every step
        assert not torch.equal(shard["x"][1, 0], shard["x"][0, 0])
        text = encode_text(pipe, [prompt])
        assert torch.equal(shard["y"][0], text["y"][0].float()) and torch.equal(shard["y"][1], text["y_null"][0].float())
        assert torch.equal(shard["mask"][0], text["mask"][0]) and torch.equal(shard["mask"][1], text["mask"][0])
        bf16 = load_file(calib_dir / shard_name(i))["x"]
        assert torch.equal(bf16, shard["x"].to(torch.bfloat16))


def test_subsample_rule_is_the_references():
    assert subsample_steps(100, 20) == list(range(0, 100, 5))
    assert subsample_steps(100, 100) == list(range(100)) and subsample_steps(100, None) == list(range(100))
    assert len(subsample_steps(100, 30)) == 34  # stride 100 // 30 = 3, as the reference
    with pytest.raises(CalibDataError, match="n_steps"):
        subsample_steps(5, 6)


def test_loader_get_and_subsampling(calib_dir_fp32):
    full = CalibDataset(calib_dir_fp32)
    assert len(full) == STEPS * 2 * 2 and full.steps == list(range(STEPS))
    assert full.latent_shape == (4, 4, 16, 16) and full.config["scheduler"]["num_sampling_steps"] == STEPS
    ds = CalibDataset(calib_dir_fp32, n_steps=2)
    assert ds.steps == [0, 2, 4] and len(ds) == 3 * 2 * 2
    shard = load_file(calib_dir_fp32 / "prompt_0001.safetensors")
    # flat index: prompt 1, kept step 1 (stored step 2), row 1 (uncond) -> 1*6 + 1*2 + 1
    batch = ds.get(torch.tensor([9, 0]))
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (2, 4, 4, 16, 16)
    assert torch.equal(batch["x"][0], shard["x"][2, 1])
    assert batch["timestep"].tolist() == [shard["timestep"][2].item(), shard["timestep"][0].item()]
    assert torch.equal(batch["y"][0], shard["y"][1]) and batch["y"].shape == (2, 1, 8, 32)
    assert torch.equal(batch["mask"][0], shard["mask"][1]) and batch["mask"].dtype == torch.int64
    with pytest.raises(IndexError):
        ds.get(torch.tensor([len(ds)]))


def test_sample_batch_with_replacement_is_reproducible(calib_dir):
    ds = CalibDataset(calib_dir, n_steps=5)
    a = ds.sample_batch(4, torch.Generator().manual_seed(0))
    b = ds.sample_batch(4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["x"].shape == (4, 4, 4, 16, 16)
    big = ds.sample_batch(3 * len(ds), torch.Generator().manual_seed(1))  # more draws than samples: repeats
    assert big["x"].shape[0] == 3 * len(ds)
    assert len({tuple(row.flatten()[:8].tolist()) for row in big["x"]}) < 3 * len(ds)


def test_compatibility(pipe, calib_dir):
    ds = CalibDataset(calib_dir)
    ds.check_compatible(pipe.model)
    ds.check_compatible((4, 16, 16), caption_channels=32, model_max_length=8)
    with pytest.raises(CalibDataError, match=r"another model or resolution.*\(4, 16, 16\).*\(4, 32, 32\)"):
        ds.check_compatible({**pipe.model.config, "input_size": [4, 32, 32]})
    with pytest.raises(CalibDataError, match="caption channels: data 32, model 4096"):
        ds.check_compatible(pipe.model, caption_channels=4096)


def test_load_errors(calib_dir, tmp_path):
    with pytest.raises(CalibDataError, match="not found"):
        CalibDataset(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(calib_dir, broken)
    (broken / "prompt_0001.safetensors").unlink()
    with pytest.raises(CalibDataError, match="prompt_0001.safetensors"):
        CalibDataset(broken)
    index = json.loads((broken / "index.json").read_text())
    (broken / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(CalibDataError, match="version"):
        CalibDataset(broken)
    (broken / "index.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(CalibDataError, match="format"):
        CalibDataset(broken)
    (broken / "index.json").write_text("{not json")
    with pytest.raises(CalibDataError, match="not valid JSON"):
        CalibDataset(broken)
    (broken / "index.json").unlink()
    with pytest.raises(CalibDataError, match="incomplete"):
        CalibDataset(broken)


def test_resume_skips_complete_shards(pipe, calib_dir, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(calib_dir, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED, progress=False)
    # A killed run: no index, one shard missing.
    (out / "index.json").unlink()
    (out / "prompt_0001.safetensors").unlink()
    kept = (out / "prompt_0000.safetensors").stat()
    capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED, progress=False)
    after = (out / "prompt_0000.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert (out / "prompt_0001.safetensors").is_file() and (out / "index.json").is_file()
    assert torch.equal(load_file(out / "prompt_0001.safetensors")["x"],
                       load_file(calib_dir / "prompt_0001.safetensors")["x"])
    # Shards from other settings are never mixed in silently.
    (out / "index.json").unlink()
    with pytest.raises(CalibDataError, match="other settings"):
        capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED + 1, progress=False)
    capture_calib_data(pipe, PROMPTS, [0, 1], out, seed=SEED + 1, progress=False, overwrite=True)
    assert json.loads((out / "index.json").read_text())["seed"] == SEED + 1
