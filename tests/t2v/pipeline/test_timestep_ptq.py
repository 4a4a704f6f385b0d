"""Stages 4 and 5 on the tiny preset with timestep-dependent quantization: `calib.timestep_ranges` R > 1
(per-range balancing statistics and static activation ranges) and ViDiT-Q's per-timestep-range bit maps."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from qdiff.api import load_quant_params, quant_layers, quantize_model, set_quant_state, set_timestep
from qdiff.balancing import smooth_scales
from qdiff.config import ConfigError, QuantConfig, apply_overrides
from qdiff.lowbit import IntExportError
from t2v.pipeline.build import build_model
from t2v.pipeline.calib_data import capture_calib_data
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.ptq import calibrate, open_calib_data
from t2v.pipeline.quant_model import build_quant_model, export_int_weights, quant_step_hook
from t2v.pipeline.sample import build_pipeline, sample_latents
from t2v.pipeline.text_embeds import read_prompts

TINY = "configs/opensora/tiny.py"
STEPS = 5  # sampling step s is plan step STEPS - 1 - s; with R = 2, steps 0-2 are range 0, steps 3-4 range 1
DATA = ["calib.n_steps=5", "calib.n_prompts=2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_inference_config(TINY)
    return cfg, build_pipeline(cfg, num_sampling_steps=STEPS)


@pytest.fixture(scope="module")
def calib(tiny, tmp_path_factory):
    cfg, pipe = tiny
    outdir = tmp_path_factory.mktemp("calib_data")
    capture_calib_data(pipe, read_prompts(cfg.prompt_path)[:2], [0, 1], outdir, seed=42, x_dtype="float32", progress=False)
    return open_calib_data(outdir, QuantConfig.from_dict({"calib": {"n_steps": 5, "n_prompts": 2}}))


def fp_model(tiny):
    cfg, pipe = tiny
    return build_model(cfg, pipe.model_input_size)


def shipped(name, *overrides):
    return apply_overrides(QuantConfig.from_yaml(f"configs/quant/{name}.yaml"), DATA + list(overrides))


def sample_recording(tiny, model, prompt_index=0):
    """Stage 5's sampling loop with `model` (hook as quant_inference installs it) -> one record per step:
    dict(range=the range index a layer used, inputs=(args, kwargs), output)."""
    cfg, pipe = tiny
    records = []
    hook = quant_step_hook(model, STEPS)

    def on_step(step, *args):
        hook(step, *args)
        records.append({})

    def record(module, args, kwargs, output):
        records[-1].update(inputs=(args, kwargs), output=output.clone())

    layer = dict(quant_layers(model))["blocks.0.attn.q"]
    handles = [model.register_forward_hook(record, with_kwargs=True),
               layer.register_forward_pre_hook(lambda m, args: records[-1].update(range=m.range_index))]
    try:
        prompt = read_prompts(cfg.prompt_path)[prompt_index]
        sample_latents(dataclasses.replace(pipe, model=model), [prompt], [prompt_index], cfg.seed, progress=False,
                       on_step=on_step)
    finally:
        for handle in handles:
            handle.remove()
    return records


def run(model, record):
    args, kwargs = record["inputs"]
    with torch.no_grad():
        return model(*args, **kwargs)


# ----------------------------------------------------------------------------- calib.timestep_ranges = 2
@pytest.fixture(scope="module")
def two_ranges(tiny, calib, tmp_path_factory):
    """Static per-tensor W8A8 and ViDiT-Q W4A8 (smoothing + rotation), each calibrated with R = 2."""
    root = tmp_path_factory.mktemp("ranges")
    runs = {}
    for name in ("w8a8_ptq", "w4a8_viditq"):
        qconfig = shipped(name, "calib.timestep_ranges=2")
        model = fp_model(tiny)
        path = calibrate(model, qconfig, calib, root / name, progress=False)
        runs[name] = qconfig, model, path
    return runs


def layer_inputs(tiny, calib, name, steps):
    """The FP inputs [rows, ..., d_in] of layer `name` on every calibration row of the given captured steps."""
    model, seen = fp_model(tiny), []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    rows = [i for i in range(len(calib)) if calib.steps[(i // 2) % len(calib.steps)] in steps]
    batch = calib.get(rows)
    with torch.no_grad():
        model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"])
    handle.remove()
    return torch.cat(seen)


def test_static_ranges_are_calibrated_per_timestep_range(tiny, calib, two_ranges):
    qconfig, model, path = two_ranges["w8a8_ptq"]
    layer = dict(quant_layers(model))["blocks.1.mlp.fc2"]
    quantizer = layer.act_quantizer
    assert quantizer.observed.tolist() == [True, True]
    for r, steps in enumerate(((0, 1, 2), (3, 4))):  # the captured steps of each range (5 steps, R = 2)
        inputs = layer_inputs(tiny, calib, "blocks.1.mlp.fc2", steps)
        torch.testing.assert_close(quantizer.x_min[r], inputs.min().clamp(max=0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(quantizer.x_max[r], inputs.max().clamp(min=0), rtol=1e-6, atol=1e-6)
    assert quantizer.x_max[0] != quantizer.x_max[1]
    stored = load_file(path)
    assert torch.equal(stored["blocks.1.mlp.fc2.act_quantizer.x_max"], quantizer.x_max)


def test_smoothing_is_calibrated_per_timestep_range(two_ranges):
    qconfig, model, _ = two_ranges["w4a8_viditq"]
    for name, layer in quant_layers(model):
        assert layer.act_absmax.shape == (2, layer.in_features) and layer.act_stats_count.min() > 0, name
        assert not torch.equal(layer.act_absmax[0], layer.act_absmax[1]), name
        expected = torch.stack([smooth_scales(row, layer.weight, qconfig.balance.alpha) for row in layer.act_absmax])
        assert torch.equal(layer.smooth_scale, expected), name
        assert layer.weight_quantizer.initialized.tolist() == [True, True]
        assert not torch.equal(layer.weight_quantizer.delta[0], layer.weight_quantizer.delta[1]), name


@pytest.mark.parametrize("name", ["w8a8_ptq", "w4a8_viditq"])
def test_two_ranges_reload_exactly_and_stage5_selects_the_step_range(tiny, calib, two_ranges, name):
    qconfig, model, path = two_ranges[name]
    stage5 = build_quant_model(fp_model(tiny), QuantConfig.from_yaml(path.parent / "quant_config.yaml"), path)
    saved = {k: v for k, v in model.state_dict().items() if "smooth_scale" in k or "act_quantizer" in k or "delta" in k}
    reloaded = stage5.state_dict()
    assert saved and all(torch.equal(reloaded[k], v) for k, v in saved.items())

    records = sample_recording(tiny, stage5)
    assert [record["range"] for record in records] == [0, 0, 0, 1, 1]
    set_quant_state(model, weight=True, act=True)
    for step, record in enumerate(records):
        set_timestep(model, step, STEPS)  # the calibrated model at the same step: the same output
        assert torch.equal(run(model, record), record["output"]), step
        set_timestep(model, 4 if step < 3 else 0, STEPS)  # a step of the other range: another output
        assert not torch.equal(run(model, record), record["output"]), step


def test_two_ranges_refuse_distillation(tiny, calib, tmp_path):
    with pytest.raises(NotImplementedError, match=r"calib\.timestep_ranges=2 with distill\.enabled.*distill\.enabled=false"):
        calibrate(fp_model(tiny), shipped("w4a6_qvdit", "calib.timestep_ranges=2"), calib, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- per-timestep-range bit maps
# The last two sampling steps (plan steps 1-0) raise some layers to 8 bits and keep one in floating point.
OVERRIDES = "  blocks.0.attn.q: 8\n  blocks.1.mlp.fc1: 8\n  blocks.0.cross_attn.proj: fp\n"


@pytest.fixture(scope="module")
def bit_runs(tiny, calib, tmp_path_factory):
    """W4A6 ViDiT-Q calibrated three times: with per-range weight and act maps (overrides at plan steps 1-0),
    with the overrides as flat maps (every step), and with no maps (base bits)."""
    root = tmp_path_factory.mktemp("bits")
    maps = {"per_range_w": f"'4-2': {{}}\n'1-0':\n{OVERRIDES}", "per_range_a": "'4-2': {}\n'1-0':\n  blocks.0.attn.q: 8\n",
            "flat_w": OVERRIDES.replace("  ", ""), "flat_a": "blocks.0.attn.q: 8\n"}
    for key, text in maps.items():
        (root / f"{key}.yaml").write_text(text)
    base = shipped("w4a8_viditq", "act.bits=6", "mixed_precision.weight_bits_file=null")
    configs = {
        "plan": [f"mixed_precision.weight_bits_file={root}/per_range_w.yaml", f"mixed_precision.act_bits_file={root}/per_range_a.yaml"],
        "uniform": [f"mixed_precision.weight_bits_file={root}/flat_w.yaml", f"mixed_precision.act_bits_file={root}/flat_a.yaml"],
        "base": [],
    }
    runs = {}
    for name, overrides in configs.items():
        path = calibrate(fp_model(tiny), apply_overrides(base, overrides), calib, root / name, progress=False)
        qconfig = QuantConfig.from_yaml(path.parent / "quant_config.yaml")  # as stage 5 reads it
        runs[name] = qconfig, path, build_quant_model(fp_model(tiny), qconfig, path)
    return runs


def test_plan_layers_hold_a_weight_range_per_width(bit_runs):
    _, path, model = bit_runs["plan"]
    layers = dict(quant_layers(model))
    assert layers["blocks.0.attn.q"].step_bits == ((0, 1, 8, 8), (2, 4, 4, 6))
    assert layers["blocks.1.mlp.fc1"].step_bits == ((0, 1, 8, 6), (2, 4, 4, 6))
    assert layers["blocks.0.cross_attn.proj"].step_bits == ((0, 1, None, 6), (2, 4, 4, 6))
    assert sum(bool(layer.step_bits) for layer in layers.values()) == 3
    stored = load_file(path)
    for name in ("blocks.0.attn.q", "blocks.1.mlp.fc1"):  # both widths' grid searches stored
        quantizer = layers[name].step_weight_quantizers["8"]
        assert quantizer.initialized.all() and torch.equal(stored[f"{name}.step_weight_quantizers.8.delta"], quantizer.delta)
    assert "blocks.0.attn.k.step_weight_quantizers.8.delta" not in stored


def test_stage5_applies_the_bits_of_each_step(tiny, bit_runs):
    _, _, plan = bit_runs["plan"]
    _, _, uniform = bit_runs["uniform"]
    _, _, base = bit_runs["base"]
    records = sample_recording(tiny, plan)
    assert len(records) == STEPS
    for step, record in enumerate(records):
        if step < 3:  # plan steps 4-2: the base bits
            assert torch.equal(record["output"], run(base, record)), step
            assert not torch.equal(record["output"], run(uniform, record)), step
        else:  # plan steps 1-0: the overrides, exactly as a model quantized with them at every step
            assert torch.equal(record["output"], run(uniform, record)), step
            assert not torch.equal(record["output"], run(base, record)), step
    # the base run's own trajectory is the plan's until its overridden steps
    base_records = sample_recording(tiny, base)
    assert [torch.equal(a["output"], b["output"]) for a, b in zip(records, base_records)] == [True] * 3 + [False] * 2


def test_plan_mismatches_are_refused(tiny, calib, bit_runs, tmp_path):
    qconfig, path, _ = bit_runs["plan"]
    model = build_quant_model(fp_model(tiny), qconfig, path)
    with pytest.raises(ValueError, match=r"covers plan steps up to 4 \(a 5-step sampler\) but sampling runs 10 steps"):
        quant_step_hook(model, 10)
    with pytest.raises(ValueError, match="run without --fold"):
        build_quant_model(fp_model(tiny), qconfig, path, fold=True)
    with pytest.raises(IntExportError, match="change bits per timestep"):
        export_int_weights(fp_model(tiny), qconfig, path, tmp_path / "int.safetensors")
    twenty = tmp_path / "t20.yaml"
    twenty.write_text("'19-10': {}\n'9-0':\n  blocks.0.attn.q: 8\n")
    other = apply_overrides(qconfig, [f"mixed_precision.weight_bits_file={twenty}"])
    with pytest.raises(ConfigError, match=r"t20\.yaml: its timestep ranges hold plan steps 0\.\.19 \(20 steps\); "
                                          r"a 5-step sampler needs 0\.\.4"):
        calibrate(fp_model(tiny), other, calib, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    lower = tmp_path / "lower.yaml"
    lower.write_text("'4-2': {}\n'1-0':\n" + OVERRIDES.replace("attn.q: 8", "attn.q: 3"))
    other = apply_overrides(qconfig, [f"mixed_precision.weight_bits_file={lower}"])
    fresh = quantize_model(fp_model(tiny), other, adapter="stdit")
    with pytest.raises(ValueError, match=r"per-range bit map weight\.1-0\.blocks\.0\.attn\.q: file has 8, current has 3"):
        load_quant_params(fresh, other, path)
