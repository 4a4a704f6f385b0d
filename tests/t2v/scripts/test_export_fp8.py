"""End to end on the tiny preset with the shipped FP8 configs: stage 3 (capture), stage 4 (calibrate), stage 6 (export
FP8 / integer-code weights), stage 5 with --hardware (FP8Linear layers) against stage 5's fake-quant simulation."""
import pytest
import torch
from safetensors.torch import load_file

from qdiff.config import QuantConfig, apply_overrides
from qdiff.lowbit import FP8Linear, IntLinear, read_int_header
from t2v.pipeline.build import build_model
from t2v.pipeline.calib_data import capture_calib_data
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.ptq import calibrate, open_calib_data
from t2v.pipeline.quant_model import build_int_model
from t2v.pipeline.sample import build_pipeline
from t2v.pipeline.text_embeds import read_prompts
from t2v.scripts import export_int, quant_inference

CONFIG = "configs/opensora/tiny.py"
STEPS = 3
COMMON = ["--num_sampling_steps", str(STEPS), "--num_prompts", "1", "--device", "cpu"]
SMALL = [f"calib.n_steps={STEPS}", "calib.n_prompts=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calib_data(tmp_path_factory):
    cfg = load_inference_config(CONFIG)
    pipe = build_pipeline(cfg, num_sampling_steps=STEPS)
    prompts = read_prompts(cfg.prompt_path)[:1]
    outdir = tmp_path_factory.mktemp("calib_data")
    capture_calib_data(pipe, prompts, [0], outdir, seed=42, x_dtype="float32", progress=False)
    return cfg, pipe, outdir


@pytest.mark.parametrize("name", ["w8a8_fp8", "w4a8_fp8"])
def test_fp8_pipeline_end_to_end(calib_data, tmp_path, name):
    cfg, pipe, data_dir = calib_data
    qconfig = apply_overrides(QuantConfig.from_yaml(f"configs/quant/{name}.yaml"), SMALL)
    calib_dir = tmp_path / name
    calibrate(build_model(cfg, pipe.model_input_size), qconfig, open_calib_data(data_dir, qconfig), calib_dir,
              progress=False)

    assert export_int.main([CONFIG, "--calib_dir", str(calib_dir), "--device", "cpu"]) == 0
    header = read_int_header(calib_dir / "int_weights.safetensors")
    assert header["format_version"] == "2" and header["formats"]["act"] == ["fp8_e4m3"]
    attn, fc1 = header["layers"]["blocks.0.attn.q"], header["layers"]["blocks.0.mlp.fc1"]
    assert fc1["w_format"] == "fp8_e4m3" and fc1["container"] == "float8_e4m3fn"
    assert attn["w_format"] == ("fp8_e4m3" if name == "w8a8_fp8" else "int")
    assert attn["container"] == ("float8_e4m3fn" if name == "w8a8_fp8" else "int4x2")

    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), *COMMON]) == 0
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--hardware", *COMMON]) == 0
    fake_dir, hw_dir = calib_dir / "videos", calib_dir / "videos_hardware"
    latents = sorted(fake_dir.glob("*.latent.safetensors"))
    assert latents and sorted(p.name for p in hw_dir.glob("*.mp4")) == sorted(p.name for p in fake_dir.glob("*.mp4"))
    for latent in latents:
        fake, real = load_file(latent)["latent"], load_file(hw_dir / latent.name)["latent"]
        assert float((real - fake).norm() / fake.norm()) < 1e-3
    # --merge_qkv: the same videos from merged q/k/v layers (w4a8_fp8's per-layer smoothing keeps them apart)
    merged_dir = calib_dir / "videos_merged"
    assert quant_inference.main([CONFIG, "--calib_dir", str(calib_dir), "--hardware", "--merge_qkv",
                                 "--outdir", str(merged_dir), *COMMON]) == 0
    for latent in latents:
        merged, real = load_file(merged_dir / latent.name)["latent"], load_file(hw_dir / latent.name)["latent"]
        assert float((merged - real).norm() / real.norm()) < 1e-5

    model = build_pipeline(cfg).model
    build_int_model(model, calib_dir / "int_weights.safetensors", qconfig)
    kinds = {type(module) for module in model.modules() if isinstance(module, (FP8Linear, IntLinear))}
    assert kinds == {FP8Linear}
    assert type(model.final_layer.linear) is torch.nn.Linear  # FP layers stay as they are


def test_fp8_distillation_trains(calib_data, tmp_path):
    """Q-VDiT-style distillation through the FP8 quantizers' straight-through gradients: TQE terms and the learnable
    FP8 weight scales move, and the result exports to FP8Linear."""
    cfg, pipe, data_dir = calib_data
    qconfig = apply_overrides(QuantConfig.from_yaml("configs/quant/w8a8_fp8.yaml"), SMALL + [
        "method=qvdit", "weight.learnable_delta=true", "tqe={rank: 4, rank_out: 1, frame_scale: true}",
        "distill.enabled=true", "distill.iterations=4", "distill.batch_size=2", "distill.lr=1e-3",
        "distill.lr_delta=1e-4", "distill.keep_best=false", "distill.quantize_activations=true"])
    model = build_model(cfg, pipe.model_input_size)
    calibrate(model, qconfig, open_calib_data(data_dir, qconfig), tmp_path, progress=False)
    layer = model.blocks[0].attn.q
    assert layer.weight_quantizer.fp8 and layer.lora_b.abs().sum() > 0  # B starts at zero: it was trained
    scale0 = layer.weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 448
    assert not torch.equal(layer.weight_quantizer.delta.detach().flatten(), scale0)  # the FP8 scale moved
    assert export_int.main([CONFIG, "--calib_dir", str(tmp_path), "--device", "cpu"]) == 0
    assert read_int_header(tmp_path / "int_weights.safetensors")["layers"]["blocks.0.attn_temp.q"]["rank_out"] == 1
