"""Stage 6 (integer export) and stage 5 --hardware on the tiny preset: the integer model samples what the
fake-quant model samples."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from qdiff.api import calibrate_balancing, init_weight_quantizers, quantize_model, save_quant_params
from qdiff.config import QuantConfig
from qdiff.lowbit import IntLinear, read_int_header
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.quant_model import build_int_model
from t2v.pipeline.sample import build_pipeline
from t2v.scripts import export_int, quant_inference

CONFIG = "configs/opensora/tiny.py"
COMMON = ["--num_sampling_steps", "3", "--num_prompts", "1", "--device", "cpu"]


def qconfig(**changes) -> QuantConfig:
    data = {
        "method": "qvdit",
        "weight": {"bits": 4, "init": "min_max"},
        "act": {"bits": 6, "mode": "dynamic_per_token"},
        "tqe": {"rank": 4, "rank_out": 1, "frame_scale": True},
        "balance": {"method": "smooth_rotate", "alpha": 0.5},
        "mixed_precision": {"weight_bits_file": "configs/quant/mixed_precision/weight_8_mlp.yaml"},
        "fp_layers_file": "configs/quant/remain_fp.txt",
        "distill": {"enabled": False},
    }
    data.update(changes)
    return QuantConfig.from_dict(data)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """What stage 4 leaves, with balancing and non-zero TQE terms (as after distillation)."""
    path = tmp_path_factory.mktemp("w4a6")
    cfg = qconfig()
    model = build_pipeline(load_inference_config(CONFIG)).model
    quantize_model(model, cfg, adapter="stdit")
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 4, 16, 16, generator=gen), torch.tensor([999, 10]), torch.randn(2, 1, 8, 32, generator=gen))
    calibrate_balancing(model, cfg, lambda: model(*inputs))
    init_weight_quantizers(model)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "lora_b", None) is not None:
                module.lora_b.normal_(0, 1e-3, generator=gen)
                module.lora_b_out.normal_(0, 1e-3, generator=gen)
    save_quant_params(model, cfg, path / "quant_params.safetensors")
    (path / "quant_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_export_then_hardware_inference(calib_dir, capsys):
    assert export_int.main([CONFIG, "--calib_dir", str(calib_dir), "--device", "cpu"]) == 0
    path = calib_dir / "int_weights.safetensors"
    header = read_int_header(path)
    assert header["method"] == "qvdit" and header["bits"] == {"weight": [4, 8], "act": [6]}
    assert header["layers"]["blocks.0.attn.q"]["container"] == "int4x2"
    assert header["layers"]["blocks.0.mlp.fc1"]["container"] == "int8"  # MLP weights at 8 bits
    assert header["model"]["info"]["hidden_size"] == 64
    # no silent overwrite
    assert export_int.main([CONFIG, "--calib_dir", str(calib_dir), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), *COMMON]) == 0
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--hardware", *COMMON]) == 0
    fake_dir, int_dir = calib_dir / "videos", calib_dir / "videos_hardware"
    latents = sorted(fake_dir.glob("*.latent.safetensors"))
    assert latents and sorted(p.name for p in int_dir.glob("*.mp4")) == sorted(p.name for p in fake_dir.glob("*.mp4"))
    for latent in latents:
        fake, real = load_file(latent)["latent"], load_file(int_dir / latent.name)["latent"]
        assert float((real - fake).norm() / fake.norm()) < 1e-3


def test_hardware_refuses_another_config(calib_dir, tmp_path, capsys):
    if not (calib_dir / "int_weights.safetensors").exists():
        assert export_int.main([CONFIG, "--calib_dir", str(calib_dir), "--device", "cpu"]) == 0
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(qconfig(act={"bits": 8, "mode": "dynamic_per_token"}).to_dict()))
    code = quant_inference.main([CONFIG, "--quant_config", str(other), "--int_weights",
                                 str(calib_dir / "int_weights.safetensors"), "--outdir", str(tmp_path / "v"), *COMMON])
    assert code == 2
    err = capsys.readouterr().err
    assert "made for another model or config" in err and "act.bits: file has 6, current has 8" in err


def test_missing_int_weights(calib_dir, tmp_path, capsys):
    code = quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--int_weights", str(tmp_path / "none.safetensors"),
                                 *COMMON])
    assert code == 2 and "integer weights not found" in capsys.readouterr().err


def test_build_int_model_swaps_quantized_linears(calib_dir):
    if not (calib_dir / "int_weights.safetensors").exists():
        assert export_int.main([CONFIG, "--calib_dir", str(calib_dir), "--device", "cpu"]) == 0
    model = build_pipeline(load_inference_config(CONFIG)).model
    build_int_model(model, calib_dir / "int_weights.safetensors", qconfig())
    names = [name for name, module in model.named_modules() if isinstance(module, IntLinear)]
    assert len(names) == 2 * 13 and "blocks.1.attn_temp.q" in names
    assert type(model.final_layer.linear) is torch.nn.Linear  # FP layers stay as they are
