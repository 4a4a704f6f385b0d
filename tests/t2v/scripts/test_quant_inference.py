"""Stage 5 end to end on the tiny preset: FP videos, a W8A8 calibration folder, quantized videos, comparison."""

import argparse

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qdiff.api import init_weight_quantizers, quant_layers, quantize_model, save_quant_params
from qdiff.config import QuantConfig
from t2v.pipeline.compare import compare_run
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.quant_model import build_quant_model, quant_step_hook
from t2v.pipeline.sample import build_pipeline
from t2v.pipeline.video_io import read_video
from t2v.scripts import compare_videos, inference, quant_inference

CONFIG = "configs/opensora/tiny.py"
COMMON = ["--num_sampling_steps", "4", "--num_prompts", "2", "--device", "cpu"]


def w8a8(**changes) -> QuantConfig:
    """W8A8, dynamic per-token activations, TQE terms at their (no-op) init, no balancing: needs no calibration."""
    data = {
        "method": "qvdit",
        "weight": {"bits": 8, "init": "min_max", "learnable_delta": True},  # min_max: no search, fast
        "act": {"bits": 8, "mode": "dynamic_per_token"},
        "tqe": {"rank": 4, "rank_out": 1, "frame_scale": True},
        "balance": {"method": "none"},
        "fp_layers_file": "configs/quant/remain_fp.txt",
        "distill": {"enabled": False},
    }
    data.update(changes)
    return QuantConfig.from_dict(data)


def write_calib_dir(path, params_config: QuantConfig, yaml_config: QuantConfig | None = None):
    """What stage 4 leaves: quant params of the tiny model + the resolved quant YAML."""
    model = build_pipeline(load_inference_config(CONFIG)).model
    quantize_model(model, params_config, adapter="stdit")
    init_weight_quantizers(model)
    save_quant_params(model, params_config, path / "quant_params.safetensors")
    (path / "quant_config.yaml").write_text(yaml.safe_dump((yaml_config or params_config).to_dict()))
    return path


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "videos"
    assert inference.main([CONFIG, "--outdir", str(out), *COMMON]) == 0
    return out


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    return write_calib_dir(tmp_path_factory.mktemp("w8a8"), w8a8())


def test_quant_inference_end_to_end(fp_dir, calib_dir, tmp_path, capsys):
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), *COMMON]) == 0
    out = calib_dir / "videos"  # default: <calib_dir>/videos
    fp_names = sorted(p.name for p in fp_dir.glob("*.mp4"))
    assert len(fp_names) == 2 and sorted(p.name for p in out.glob("*.mp4")) == fp_names
    for name in fp_names:
        assert read_video(out / name).shape == read_video(fp_dir / name).shape
    result = compare_run(fp_dir, out)
    assert 0 < result.latent_rel_error < 0.05, result.latent_rel_error  # W8: close to FP, not identical
    # Folding the weights changes nothing but speed.
    folded = tmp_path / "folded"
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--outdir", str(folded), "--fold", *COMMON]) == 0
    for latent in out.glob("*.latent.safetensors"):
        a, b = load_file(latent)["latent"], load_file(folded / latent.name)["latent"]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    # The comparison CLI on the same folders.
    table_path = tmp_path / "table.md"
    assert compare_videos.main([str(fp_dir), str(out), "--names", "w8a8", "--out", str(table_path)]) == 0
    printed = capsys.readouterr().out
    assert printed == table_path.read_text() and "| w8a8 | 2 | " in printed
    # Existing videos are never replaced silently.
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), *COMMON]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_missing_quant_params(tmp_path, capsys):
    (tmp_path / "quant_config.yaml").write_text(yaml.safe_dump(w8a8().to_dict()))
    assert quant_inference.main([CONFIG, "--calib_dir", str(tmp_path), *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: quant params not found") and "quant_params.safetensors" in err


def test_missing_quant_config(calib_dir, tmp_path, capsys):
    code = quant_inference.main([CONFIG, "--quant_config", str(tmp_path / "none.yaml"),
                                 "--quant_params", str(calib_dir / "quant_params.safetensors"), *COMMON])
    assert code == 2 and "quant config not found" in capsys.readouterr().err


def test_quant_params_from_another_config(tmp_path, capsys):
    params_cfg = w8a8()
    other = w8a8(weight={"bits": 4, "init": "min_max", "learnable_delta": True})
    write_calib_dir(tmp_path, params_cfg, yaml_config=other)
    assert quant_inference.main([CONFIG, "--calib_dir", str(tmp_path), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "made for another model or config" in err and "weight.bits: file has 8, current has 4" in err


def test_step_hook_selects_timestep_ranges():
    model = build_pipeline(load_inference_config(CONFIG)).model
    build_quant_model(model, w8a8(calib={"timestep_ranges": 2}))
    hook = quant_step_hook(model, num_steps=4)
    seen = []
    for step in range(4):
        hook(step, None, None, None, None)
        seen.append({layer.range_index for _, layer in quant_layers(model)})
    assert seen == [{0}, {0}, {1}, {1}]


def test_cuda_graph_flag_errors(calib_dir, tmp_path, capsys):
    """--cuda_graph needs --compile and a GPU, and refuses models whose quantization changes per timestep."""
    from t2v.scripts._common import cuda_graph_if_requested

    code = quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--outdir", str(tmp_path / "a"),
                                 "--cuda_graph", *COMMON])
    assert code == 2 and "--cuda_graph needs --compile" in capsys.readouterr().err
    pipe = build_pipeline(load_inference_config(CONFIG))
    args = argparse.Namespace(compile=True, cuda_graph=True)
    with pytest.raises(ValueError, match="needs a CUDA device; this run is on cpu"):
        cuda_graph_if_requested(pipe, args)
    build_quant_model(pipe.model, w8a8(calib={"timestep_ranges": 2}))
    pipe.device = torch.device("cuda")  # only the checks run: nothing touches the device before them
    with pytest.raises(ValueError, match="change their quantization per timestep"):
        cuda_graph_if_requested(pipe, args)
    assert pipe.runner is None
    cuda_graph_if_requested(pipe, argparse.Namespace(compile=True, cuda_graph=False))
    assert pipe.runner is None


def test_fast_fills_in_the_fastest_settings_and_explicit_flags_win(monkeypatch):
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "0")  # --fast sets it (qdiff.blas): restored after the test
    base = [CONFIG, "--calib_dir", "unused"]
    plain = quant_inference.parse_args(base)
    assert (plain.compile, plain.cuda_graph, plain.merge_qkv) == (False, False, False)
    assert (plain.temporal_attention, plain.int_act_quant, plain.fast_accum) == ("math", "torch", False)
    fast = quant_inference.parse_args([*base, "--hardware", "--fast"])
    assert (fast.compile, fast.cuda_graph, fast.merge_qkv) == (True, True, True)
    assert (fast.temporal_attention, fast.int_act_quant, fast.fast_accum) == ("short_triton", "fused", True)
    assert (plain.cross_attention, fast.cross_attention) == ("sdpa", "triton")
    assert (plain.cublaslt_workspace, fast.cublaslt_workspace) == ("default", "none")
    mixed = quant_inference.parse_args([*base, "--fast", "--temporal_attention", "sdpa", "--int_act_quant", "kernel",
                                        "--no-fast_accum"])
    assert (mixed.temporal_attention, mixed.int_act_quant, mixed.compile) == ("sdpa", "kernel", True)
    assert mixed.fast_accum is False and quant_inference.parse_args([*base, "--fast_accum"]).fast_accum is True
    fp = inference.parse_args([CONFIG, "--fast"])
    assert (fp.compile, fp.cuda_graph, fp.merge_qkv, fp.temporal_attention) == (True, True, True, "short_triton")
    assert inference.parse_args([CONFIG]).temporal_attention == "math"


def test_fast_accum_reaches_every_fp8_layer():
    from qdiff.lowbit.fp8_linear import FP8Linear
    from t2v.scripts._common import compile_if_requested

    model = torch.nn.Sequential(FP8Linear(32, 16), torch.nn.Linear(16, 16), FP8Linear(16, 32, bias=False))
    compile_if_requested(model, argparse.Namespace(fast_accum=False))
    assert [m.fast_accum for m in model if isinstance(m, FP8Linear)] == [False, False]
    compile_if_requested(model, argparse.Namespace(fast_accum=True))
    assert [m.fast_accum for m in model if isinstance(m, FP8Linear)] == [True, True]
