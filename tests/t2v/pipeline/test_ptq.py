"""Stage 4 (t2v.pipeline.ptq) on the tiny preset: a small captured calibration set, a W4A6 Q-VDiT run."""
import functools
import json

import pytest
import torch

from qdiff.api import load_quant_params, quantize_model, set_quant_state
from qdiff.config import QuantConfig, apply_overrides
from qdiff.distill.trainer import CHECKPOINT_NAME
from t2v.pipeline.build import build_model
from t2v.pipeline.calib_data import CalibDataError, CalibDataset, capture_calib_data
from t2v.pipeline.config import load_inference_config
from t2v.pipeline.ptq import CalibrationMismatchError, calibrate, open_calib_data
from t2v.pipeline.sample import build_pipeline
from t2v.pipeline.text_embeds import read_prompts

TINY = "configs/opensora/tiny.py"
STEPS = 5
W4A6 = ["calib.n_steps=5", "calib.n_prompts=2", "distill.lr=5e-4", "distill.lr_delta=1e-5",
        "distill.checkpoint_every=10"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_inference_config(TINY)
    pipe = build_pipeline(cfg, num_sampling_steps=STEPS)
    return cfg, pipe


@pytest.fixture(scope="module")
def calib_dir(tiny, tmp_path_factory):
    cfg, pipe = tiny
    prompts = read_prompts(cfg.prompt_path)[:2]
    outdir = tmp_path_factory.mktemp("calib_data")
    return capture_calib_data(pipe, prompts, [0, 1], outdir, seed=42, x_dtype="float32", progress=False)


def fp_model(tiny):
    cfg, pipe = tiny
    return build_model(cfg, pipe.model_input_size)


def w4a6(*overrides):
    return apply_overrides(QuantConfig.from_yaml("configs/quant/w4a6_qvdit.yaml"), W4A6 + list(overrides))


def outputs(model, batch, act=True):
    set_quant_state(model, weight=True, act=act)
    with torch.no_grad():
        return model(batch["x"], batch["timestep"], batch["y"], mask=batch["mask"])


def relative_error(pred, target):
    return float((pred - target).norm() / target.norm())


def load_calibrated(tiny, qconfig, outdir):
    model = quantize_model(fp_model(tiny), qconfig, adapter="stdit")
    load_quant_params(model, qconfig, outdir / "quant_params.safetensors")
    return model


@pytest.fixture(scope="module")
def w4a6_runs(tiny, calib_dir, tmp_path_factory):
    """The same W4A6 config calibrated twice: PTQ only, and with 30 distillation iterations."""
    root = tmp_path_factory.mktemp("ptq")
    qconfig = w4a6("distill.iterations=30")
    ptq_only = apply_overrides(qconfig, ["distill.enabled=false"])
    calib = open_calib_data(calib_dir, qconfig)
    calibrate(fp_model(tiny), ptq_only, calib, root / "ptq", progress=False)
    model = fp_model(tiny)
    path = calibrate(model, qconfig, calib, root / "distilled", progress=False)
    return qconfig, ptq_only, calib, root, model, path


def test_distillation_lowers_loss_and_output_error(tiny, w4a6_runs):
    qconfig, ptq_only, calib, root, _, _ = w4a6_runs
    report = json.loads((root / "distilled" / "distill_history.json").read_text())
    losses = [entry["loss"] for entry in report["history"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert report["final"]["relative_error"] < 0.9 * report["ptq_init"]["relative_error"]
    assert report["kept"] == "distilled"

    # independently: reload both results into fresh models, W4A6 (weights AND activations quantized)
    distilled = load_calibrated(tiny, qconfig, root / "distilled")
    ptq = load_calibrated(tiny, ptq_only, root / "ptq")
    batch = calib.get(torch.arange(1, len(calib), 3))  # fixed rows across prompts, steps, cond/uncond
    target = outputs(fp_model(tiny), batch)
    error_ptq = relative_error(outputs(ptq, batch), target)
    error_distilled = relative_error(outputs(distilled, batch), target)
    assert 0 < error_distilled < 0.9 * error_ptq
    ptq_report = json.loads((root / "ptq" / "distill_history.json").read_text())
    assert "history" not in ptq_report
    assert ptq_report["final"] == ptq_report["ptq_init"] == report["ptq_init"]


def test_keep_best_returns_the_ptq_initialisation_when_distillation_ends_worse(tiny, calib_dir, w4a6_runs, tmp_path):
    _, _, _, root, _, _ = w4a6_runs
    ruinous = w4a6("distill.iterations=4", "distill.lr=3.0")  # a learning rate that makes the model worse
    calib = open_calib_data(calib_dir, ruinous)
    calibrate(fp_model(tiny), ruinous, calib, tmp_path / "best", progress=False)
    report = json.loads((tmp_path / "best" / "distill_history.json").read_text())
    assert report["distilled"]["relative_error"] > 1.5 * report["ptq_init"]["relative_error"]
    assert report["kept"] == "ptq_init" and report["final"] == report["ptq_init"]
    # the saved params are the PTQ initialisation: the same outputs as the PTQ-only run of this config
    batch = calib.get(torch.tensor([0, 7, 19]))
    kept = load_calibrated(tiny, ruinous, tmp_path / "best")
    ptq = load_calibrated(tiny, apply_overrides(ruinous, ["distill.enabled=false"]), root / "ptq")
    assert torch.equal(outputs(kept, batch), outputs(ptq, batch))

    last = apply_overrides(ruinous, ["distill.keep_best=false"])  # the reference's behaviour: the last iterate
    calibrate(fp_model(tiny), last, calib, tmp_path / "last", progress=False)
    report_last = json.loads((tmp_path / "last" / "distill_history.json").read_text())
    assert "kept" not in report_last
    assert report_last["final"]["relative_error"] == pytest.approx(report["distilled"]["relative_error"], rel=1e-5)


def test_outputs_written_and_reload_identically(tiny, w4a6_runs):
    qconfig, _, calib, root, model, path = w4a6_runs
    outdir = root / "distilled"
    assert path == outdir / "quant_params.safetensors"
    for name in ("quant_params.safetensors", "quant_config.yaml", "inference_config.py", "distill_history.json",
                 CHECKPOINT_NAME):
        assert (outdir / name).is_file(), name
    batch = calib.get(torch.tensor([0, 7, 19]))
    reloaded = load_calibrated(tiny, qconfig, outdir)
    for act in (False, True):
        assert torch.equal(outputs(model, batch, act), outputs(reloaded, batch, act))
    # the resolved configs read back
    assert QuantConfig.from_yaml(outdir / "quant_config.yaml").to_dict() == qconfig.to_dict()
    inference = load_inference_config(outdir / "inference_config.py")
    assert inference.replace(source="") == load_inference_config(TINY).replace(
        source="", scheduler=inference.scheduler)
    assert inference.scheduler.num_sampling_steps == STEPS  # as the data were captured


def test_existing_results_need_resume_or_overwrite(tiny, w4a6_runs):
    qconfig, _, calib, root, _, _ = w4a6_runs
    with pytest.raises(FileExistsError, match="--resume"):
        calibrate(fp_model(tiny), qconfig, calib, root / "distilled", progress=False)
    other = apply_overrides(qconfig, ["act.bits=8"])
    with pytest.raises(CalibrationMismatchError, match="act"):
        calibrate(fp_model(tiny), other, calib, root / "distilled", resume=True, progress=False)


def test_resume_after_kill_equals_uninterrupted(tiny, calib_dir, tmp_path, monkeypatch):
    qconfig = w4a6("distill.iterations=8", "distill.checkpoint_every=3")
    calib = open_calib_data(calib_dir, qconfig)
    calibrate(fp_model(tiny), qconfig, calib, tmp_path / "full", progress=False)

    calls = {"n": 0}
    original = CalibDataset.sample_batch

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # iteration 8 of 8 (the last checkpoint was at 6)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CalibDataset, "sample_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        calibrate(fp_model(tiny), qconfig, calib, tmp_path / "run", progress=False)
    monkeypatch.setattr(CalibDataset, "sample_batch", original)
    assert not (tmp_path / "run" / "quant_params.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # the trainer's checkpoint is there
        calibrate(fp_model(tiny), qconfig, calib, tmp_path / "run", progress=False)
    calibrate(fp_model(tiny), qconfig, calib, tmp_path / "run", resume=True, progress=False)

    full = json.loads((tmp_path / "full" / "distill_history.json").read_text())
    resumed = json.loads((tmp_path / "run" / "distill_history.json").read_text())
    assert resumed["resumed_from"] == 6 and resumed["history"] == full["history"]
    assert resumed["final"] == full["final"]
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "full" / "quant_params.safetensors"), load_file(tmp_path / "run" / "quant_params.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_distillation_runs_under_static_inputs_and_math_temporal_attention(tiny, calib_dir, tmp_path,
                                                                                    monkeypatch):
    """With `distill.compile`, stage 4 distils with fixed-shape block inputs and the "math" temporal attention, for
    the distillation only; compiled once (aot_eager here), new text lengths in later batches do not recompile."""
    import torch._dynamo

    import qdiff.distill.trainer as trainer
    import t2v.pipeline.ptq as ptq
    from qdiff.distill.checkpointing import compiled

    compiled_settings = dict(temporal_attention="math", static_block_inputs=True)
    qconfig = w4a6("distill.iterations=2")
    assert ptq.distill_settings(qconfig.distill, "cpu") == {}
    assert ptq.distill_settings(qconfig.distill, "cuda") == {}  # "auto": too short a run to compile
    assert ptq.distill_settings(w4a6("distill.iterations=1000").distill, "cuda") == compiled_settings
    qconfig = apply_overrides(qconfig, ["distill.compile=true", "distill.iterations=6"])
    assert ptq.distill_settings(qconfig.distill, "cpu") == compiled_settings

    seen = []
    original = ptq.distill

    def recording(model, *args, **kwargs):
        seen.append((model.static_block_inputs, [(b.attn.core, b.attn_temp.core) for b in model.blocks]))
        # two graphs (block 0's input needs no gradient, the others' do), then no more whatever the text lengths
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            return original(model, *args, **kwargs)

    monkeypatch.setattr(ptq, "distill", recording)
    monkeypatch.setattr(trainer, "compiled", functools.partial(compiled, backend="aot_eager"))
    calib = open_calib_data(calib_dir, qconfig)
    assert len({int(calib.get(torch.tensor([i]))["mask"].sum()) for i in range(len(calib))}) > 1  # lengths vary
    torch._dynamo.reset()
    model = fp_model(tiny)
    calibrate(model, qconfig, calib, tmp_path, progress=False)
    torch._dynamo.reset()
    assert seen == [(True, [("sdpa", "math")] * len(model.blocks))]
    assert not model.static_block_inputs and all(b.attn_temp.core == "sdpa" for b in model.blocks)


def test_smoothing_config_uses_fp_teacher_copy(tiny, calib_dir, tmp_path):
    # W4A8 Q-VDiT (smoothing α 0.11, TMD on): the balanced model is FP only up to rounding -> a teacher copy
    qconfig = apply_overrides(QuantConfig.from_yaml("configs/quant/w4a8_qvdit.yaml"),
                              ["calib.n_steps=5", "calib.n_prompts=2", "distill.iterations=3", "distill.lr=5e-4"])
    calib = open_calib_data(calib_dir, qconfig)
    model = fp_model(tiny)
    calibrate(model, qconfig, calib, tmp_path, progress=False, balance_rows=8)
    report = json.loads((tmp_path / "distill_history.json").read_text())
    assert len(report["history"]) == 3 and all(entry["tmd"] > 0 for entry in report["history"])
    assert 0 < report["final"]["relative_error"] < 0.2
    reloaded = load_calibrated(tiny, qconfig, tmp_path)
    batch = calib.get(torch.tensor([2, 11]))
    assert torch.equal(outputs(model, batch), outputs(reloaded, batch))
    assert any(layer.smooth_scale is not None for layer in reloaded.modules() if hasattr(layer, "smooth_scale"))


def test_errors(tiny, calib_dir, tmp_path):
    with pytest.raises(CalibDataError, match="n_steps"):
        open_calib_data(calib_dir, w4a6("calib.n_steps=20"))
    with pytest.raises(CalibDataError, match="n_prompts"):
        open_calib_data(calib_dir, w4a6("calib.n_prompts=10"))
    with pytest.raises(CalibDataError, match="not found"):
        open_calib_data(tmp_path / "missing", w4a6())
    calib = open_calib_data(calib_dir, w4a6())
    cfg, _ = tiny
    other_size = build_model(cfg, (4, 8, 8))
    with pytest.raises(CalibDataError, match="another model"):
        calibrate(other_size, w4a6(), calib, tmp_path / "a", progress=False)
    with pytest.raises(NotImplementedError, match="timestep_ranges"):
        calibrate(fp_model(tiny), w4a6("calib.timestep_ranges=2"), calib, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # subsampled data: a dataset opened with other steps than the config says is refused
    with pytest.raises(CalibDataError, match="n_steps"):
        calibrate(fp_model(tiny), w4a6(), CalibDataset(calib_dir, n_steps=1), tmp_path / "c", progress=False)
