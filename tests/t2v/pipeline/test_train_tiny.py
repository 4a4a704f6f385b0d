"""Tiny text-to-video training on CPU with a micro config: the loss falls, resume is bit-exact, the checkpoint
loads through the tiny_trained preset and samples videos, and the pieces fail with clear errors."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from qdiff.api import quantize_model, set_quant_state
from qdiff.config import QuantConfig
from t2v.data import shapes
from t2v.models.tiny_t2v import TinyT2V, read_tiny_metadata, tiny_state_dict
from t2v.pipeline.build import build_model
from t2v.pipeline.config import ConfigError, load_inference_config
from t2v.pipeline.sample import build_pipeline, generate_videos
from t2v.pipeline.train_tiny import (MODEL_NAME, STATE_NAME, TrainConfig, build_tiny_model, caption_token_table,
                                     drop_caption_words, lr_at, mse_weights, new_state, sample_timesteps, train,
                                     train_step, x0_floor_at)
from t2v.pipeline.video_io import read_video
from t2v.schedulers.iddpm import IDDPM
from t2v.scripts import train_tiny as train_tiny_cli

MICRO = dict(device="cpu", batch_size=4, depth=1, hidden_size=32, num_heads=2, text_d_model=16, text_layers=1,
             text_heads=2, text_d_ff=32, num_frames=4, patch_size=(1, 8, 8), eval_prompts=0, log_every=1,
             ckpt_every=1000)
PRESET = "configs/opensora/tiny_trained.py"
QUIET = dict(print_fn=lambda message: None)


def tiny_trained_config(path, **changes):
    """The tiny_trained preset pointed at `path`, with the micro model's 4 frames (the prediction comes from the file)."""
    cfg = load_inference_config(PRESET)
    return cfg.replace(model={**cfg.model, "from_pretrained": str(path)}, num_frames=4,
                       text_encoder={**cfg.text_encoder, "from_pretrained": str(path)}, **changes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model trained for 3 steps: its output folder."""
    outdir = tmp_path_factory.mktemp("tiny") / "run"
    train(TrainConfig(steps=3, **MICRO), outdir, **QUIET)
    return outdir


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    cfg = TrainConfig(lr=3e-3, warmup_steps=1, **{**MICRO, "batch_size": 8})
    state, diffusion = new_state(cfg, torch.device("cpu")), IDDPM(num_sampling_steps=1000)
    ids, mask = caption_token_table(state.module, "cpu")
    gen = torch.Generator().manual_seed(123)
    videos, caption_ids = shapes.sample_batch(32, gen, "train", cfg.spec())
    index, noise = torch.randint(0, 1000, (32,), generator=gen), torch.randn(videos.shape, generator=gen)

    def fixed_batch_mse(module):
        with torch.no_grad():
            y = module.eval().encode_text(ids[caption_ids], mask[caption_ids])
            kwargs = {"y": y, "mask": mask[caption_ids]}
            return diffusion.training_losses(module.dit, videos, index, kwargs, noise=noise)["mse"].mean().item()

    before = fixed_batch_mse(state.module)
    assert abs(before - 1.0) < 0.05  # zero-initialised final layer: eps = 0 at the start
    for _ in range(30):
        out = train_step(state, diffusion, ids, mask, autocast=False)
        assert torch.isfinite(out["loss"])
    assert fixed_batch_mse(state.module) < 0.95 * before and fixed_batch_mse(state.ema) < 0.95 * before


def test_resume_equals_uninterrupted_bit_exactly(tmp_path):
    train(TrainConfig(steps=4, **MICRO), tmp_path / "straight", **QUIET)
    train(TrainConfig(steps=2, **MICRO), tmp_path / "resumed", **QUIET)
    train(TrainConfig(steps=4, **MICRO), tmp_path / "resumed", resume=True, **QUIET)
    a, b = load_file(tmp_path / "straight" / STATE_NAME), load_file(tmp_path / "resumed" / STATE_NAME)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert [entry["step"] for entry in log["intervals"]] == [1, 2, 3, 4]


def test_resume_refuses_another_architecture_and_existing_state_needs_a_flag(trained):
    with pytest.raises(ValueError, match="depth: saved 1, now 2"):
        train(TrainConfig(steps=4, **{**MICRO, "depth": 2}), trained, resume=True, **QUIET)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(steps=4, **MICRO), trained, **QUIET)


def test_outputs_and_checkpoint_metadata(trained):
    for name in (MODEL_NAME, STATE_NAME, "train_log.json", "loss_curve.png"):
        assert (trained / name).is_file()
    info = read_tiny_metadata(trained / MODEL_NAME)
    assert info["vocabulary"] == shapes.vocabulary() and info["step"] == 3 and info["seed"] == 0
    assert info["recipe"]["depth"] == 1 and info["dit_config"]["patch_size"] == [1, 8, 8]
    tensors = load_file(trained / MODEL_NAME)
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert all(k.startswith(("dit.", "text.")) for k in tensors) and "dit.pos_embed" not in tensors


def test_checkpoint_round_trips_through_the_preset_and_samples_videos(trained, tmp_path):
    cfg = tiny_trained_config(trained / MODEL_NAME, batch_size=2)
    pipe = build_pipeline(cfg, num_sampling_steps=3)
    ema = load_file(trained / STATE_NAME)
    for name, value in pipe.model.state_dict().items():
        if name not in ("pos_embed", "pos_embed_temporal"):
            assert torch.equal(value, ema[f"ema.dit.{name}"].half().float()), name
    prompts = shapes.heldout_prompts()[:2]
    paths = generate_videos(pipe, prompts, tmp_path, progress=False)
    assert len(paths) == 2 and read_video(paths[0]).shape == (4, 32, 32, 3)
    latent = load_file(str(paths[0]).replace(".mp4", ".latent.safetensors"))["latent"]
    assert latent.shape == (3, 4, 32, 32)  # pixel space: the latent is the video (before the clamp to [-1, 1])
    assert torch.equal(pipe.vae.decode(latent), latent.clamp(-1, 1))


def test_unknown_word_and_missing_checkpoint_are_clear_errors(trained, tmp_path):
    pipe = build_pipeline(tiny_trained_config(trained / MODEL_NAME), num_sampling_steps=2)
    with pytest.raises(ValueError, match=r"unknown word 'purple'.*'magenta'"):
        pipe.text_encoder.encode(["a purple circle moving left on a black background"])
    missing = tiny_trained_config(tmp_path / "nowhere.safetensors")
    with pytest.raises(ConfigError, match=r"model.from_pretrained.*not found.*t2v.scripts.train_tiny"):
        build_pipeline(missing)
    with pytest.raises(ConfigError, match=r"trained for input"):
        build_model(tiny_trained_config(trained / MODEL_NAME), (16, 32, 32))


def test_quantize_model_runs_on_the_trained_dit(trained):
    pipe = build_pipeline(tiny_trained_config(trained / MODEL_NAME), num_sampling_steps=2)
    text = pipe.text_encoder.encode(shapes.heldout_prompts()[:2])
    x, t = torch.randn(2, 3, 4, 32, 32), torch.tensor([900, 100])
    reference = pipe.model(x, t, text["y"], mask=text["mask"])
    quantize_model(pipe.model, QuantConfig.from_yaml("configs/quant/w8a8_qvdit.yaml"), adapter="stdit")
    set_quant_state(pipe.model, weight=True, act=True)
    quantized = pipe.model(x, t, text["y"], mask=text["mask"])
    assert quantized.shape == (2, 6, 4, 32, 32) and torch.isfinite(quantized).all()
    assert (quantized - reference).norm() / reference.norm() < 0.1


def test_time_budget_stops_cleanly_and_cli(tmp_path, capsys):
    state = train(TrainConfig(steps=50, max_minutes=1e-6, **MICRO), tmp_path / "budget", **QUIET)
    assert state.step <= 1 and (tmp_path / "budget" / MODEL_NAME).is_file()  # 60 µs: at most the first step
    args = ["--outdir", str(tmp_path / "cli"), "--steps", "1", "--eval_prompts", "1", "--eval_steps", "2"]
    args += [item for key, value in MICRO.items() if key not in ("eval_prompts",)
             for item in (f"--{key}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value))]
    assert train_tiny_cli.main(args) == 0
    log = json.loads((tmp_path / "cli" / "train_log.json").read_text())
    assert set(log["eval"]["heldout"]["accuracy"]) == {"colour", "shape", "motion", "all"}
    assert (tmp_path / "cli" / "eval_samples.png").is_file()
    assert train_tiny_cli.main(args) == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_tiny_cli.main(["--help"])
    assert exit_info.value.code == 0


def test_default_model_fits_the_25_mb_budget():
    module = build_tiny_model(TrainConfig())
    assert isinstance(module, TinyT2V) and module.dit.num_temporal * module.dit.num_spatial == 1024
    size = sum(v.numel() * v.element_size() for v in tiny_state_dict(module, torch.float16).values())
    assert size < 20e6, f"{size / 1e6:.1f} MB"


def test_min_snr_weights_follow_the_formula():
    diffusion = IDDPM(num_sampling_steps=1000)
    index = torch.tensor([0, 100, 500, 999])
    alpha_bar = diffusion.schedule.alphas_cumprod[index]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=snr.dtype)) / snr
    weights = mse_weights(TrainConfig(loss_weighting="min_snr", min_snr_gamma=5.0), diffusion, index)
    torch.testing.assert_close(weights, expected.float())
    assert weights[0] < 1e-3 and weights[-1] == 1.0  # low noise damped, high noise (SNR < gamma) untouched
    assert torch.equal(mse_weights(TrainConfig(), diffusion, index), torch.ones(4))
    with pytest.raises(ValueError, match="loss_weighting"):
        TrainConfig(loss_weighting="snr")


def test_x0_weight_floor_keeps_the_x0_space_weight_of_high_noise_steps():
    diffusion = IDDPM(num_sampling_steps=1000)
    index = torch.tensor([0, 100, 500, 800, 999])
    alpha_bar = diffusion.schedule.alphas_cumprod[index].float()
    snr = alpha_bar / (1 - alpha_bar)
    cfg = TrainConfig(loss_weighting="min_snr", min_snr_gamma=5.0, x0_weight_floor=0.05)
    weights = mse_weights(cfg, diffusion, index)
    x0_weights = weights * snr  # what each sample's x0 MSE is weighed by
    torch.testing.assert_close(x0_weights, torch.maximum(snr.clamp(max=5.0), torch.tensor(0.05)))
    assert weights[0] < 1e-3  # low noise: min_snr untouched (its x0 weight 5 is above the floor)
    assert weights[-1] > 1000  # t = 999: SNR ≈ 4e-5, so the weight is 0.05 / SNR
    plain = mse_weights(TrainConfig(x0_weight_floor=0.05), diffusion, index)
    torch.testing.assert_close(plain, torch.maximum(torch.ones(5), 0.05 / snr))
    with pytest.raises(ValueError, match="x0_weight_floor"):
        TrainConfig(x0_weight_floor=-1.0)
    # an explicit floor (the annealed one of a step) replaces the configured floor
    torch.testing.assert_close(mse_weights(cfg, diffusion, index, floor=0.0),
                               mse_weights(TrainConfig(loss_weighting="min_snr", min_snr_gamma=5.0), diffusion, index))


def test_the_annealed_x0_floor_follows_a_cosine_from_the_floor_to_the_final_value():
    cfg = TrainConfig(x0_weight_floor=1.0, x0_weight_floor_final=0.2, steps=1100, warmup_steps=100)
    assert x0_floor_at(cfg, 0) == x0_floor_at(cfg, 100) == 1.0  # constant through the warmup
    assert x0_floor_at(cfg, 600) == pytest.approx(0.6)  # halfway: the mean of the two
    assert x0_floor_at(cfg, 1100) == pytest.approx(0.2) and x0_floor_at(cfg, 5000) == pytest.approx(0.2)
    assert x0_floor_at(TrainConfig(x0_weight_floor=0.7, steps=1100), 900) == 0.7  # -1: constant
    with pytest.raises(ValueError, match="x0_weight_floor_final"):
        TrainConfig(x0_weight_floor_final=-0.5)


def test_init_from_loads_the_weights_and_counts_their_steps(trained):
    source = trained / MODEL_NAME
    state = new_state(TrainConfig(init_from=str(source), **MICRO), torch.device("cpu"))
    shipped = load_file(source)
    for name, value in tiny_state_dict(state.module).items():
        assert torch.equal(value, shipped[name].float()), name
    assert state.steps_before == read_tiny_metadata(source)["step"] == 3
    with pytest.raises(ValueError, match="another architecture.*hidden_size"):
        new_state(TrainConfig(init_from=str(source), **{**MICRO, "hidden_size": 64}), torch.device("cpu"))


def test_a_non_finite_gradient_skips_the_update():
    cfg = TrainConfig(**MICRO)
    state = new_state(cfg, torch.device("cpu"))
    token_ids, token_mask = caption_token_table(state.module, torch.device("cpu"))
    diffusion = IDDPM(num_sampling_steps=1000)
    with torch.no_grad():
        state.module.dit.final_layer.linear.bias[0] = float("nan")
    before = {k: v.clone() for k, v in tiny_state_dict(state.module).items()}
    ema_before = {k: v.clone() for k, v in tiny_state_dict(state.ema).items()}
    terms = train_step(state, diffusion, token_ids, token_mask, autocast=False)
    assert terms["skipped"].item() == 1.0 and terms["loss"].item() == 0.0  # decided on the device, no sync
    after, ema_after = tiny_state_dict(state.module), tiny_state_dict(state.ema)
    kept = [k for k in before if k != "dit.final_layer.linear.bias"]
    assert all(torch.equal(before[k], after[k]) for k in kept)
    assert all(torch.equal(ema_before[k], ema_after[k]) for k in kept)
    # AdamW's moments and its step count stay at zero: the update never happened
    for param_state in state.optimizer.state.values():
        assert param_state["step"].item() == 0
        assert not param_state["exp_avg"].any() and not param_state["exp_avg_sq"].any()
    assert state.step == 1  # counts the attempt; train() adds the skip to state.skipped_steps when it logs


def test_train_counts_skipped_updates_and_stops_after_too_many(tmp_path, monkeypatch):
    import t2v.pipeline.train_tiny as train_tiny
    cfg = TrainConfig(**{**MICRO, "steps": 4, "log_every": 2, "ckpt_every": 4, "eval_prompts": 0})
    real_step = train_tiny.train_step

    def poisoned_step(state, *args, **kwargs):  # a NaN weight makes every loss non-finite
        with torch.no_grad():
            state.module.dit.final_layer.linear.bias[0] = float("nan")
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(train_tiny, "train_step", poisoned_step)
    lines = []
    state = train(cfg, tmp_path / "a", print_fn=lines.append)
    assert state.step == 4 and state.skipped_steps == 4
    assert sum("2 update(s) skipped" in line for line in lines) == 2
    monkeypatch.setattr(train_tiny, "MAX_SKIPPED_STEPS", 1)
    with pytest.raises(FloatingPointError, match="step 2: more than 1 steps with a non-finite"):
        train(cfg, tmp_path / "b", print_fn=lines.append)


def test_high_t_fraction_draws_that_share_of_the_batch_from_the_high_range():
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=1000, high_t_fraction=0.25, high_t_start=600)
    index = sample_timesteps(cfg, 1000, "cpu")
    assert index.shape == (1000,) and index.dtype == torch.int64
    assert index[:250].min() >= 600 and index.max() < 1000
    assert abs((index[250:] < 600).float().mean() - 0.6) < 0.06  # the rest stays uniform on [0, 1000)
    torch.manual_seed(0)
    uniform = sample_timesteps(TrainConfig(batch_size=1000), 1000, "cpu")
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, 1000, (1000,)))  # the default draws exactly as before
    for bad in (dict(high_t_fraction=1.5), dict(high_t_start=1000)):
        with pytest.raises(ValueError, match="high_t"):
            TrainConfig(**bad)


def test_temporal_table_placement_can_continue_a_model_trained_without(trained):
    source = trained / MODEL_NAME
    state = new_state(TrainConfig(init_from=str(source), temporal_pos="input", **MICRO), torch.device("cpu"))
    assert state.module.dit.temporal_pos == "input" and state.module.metadata()["dit_config"]["temporal_pos"] == "input"
    shipped = load_file(source)
    assert all(torch.equal(v, shipped[k].float()) for k, v in tiny_state_dict(state.module).items())
    assert "temporal_pos" not in build_tiny_model(TrainConfig(**MICRO)).dit.config
    with pytest.raises(ValueError, match="temporal_pos"):
        TrainConfig(temporal_pos="everywhere")


def test_v_prediction_weights_keep_the_same_x0_space_weighting():
    """An x0 error e is a v error √(SNR+1)·e: min-SNR and the floor are the same x0-space weights as for ε."""
    diffusion = IDDPM(num_sampling_steps=1000, prediction="v")
    index = torch.tensor([0, 100, 500, 800, 999])
    alpha_bar = diffusion.schedule.alphas_cumprod[index].float()
    snr = alpha_bar / (1 - alpha_bar)
    cfg = TrainConfig(prediction="v", loss_weighting="min_snr", min_snr_gamma=5.0, x0_weight_floor=0.05)
    x0_weights = mse_weights(cfg, diffusion, index) * (snr + 1)
    torch.testing.assert_close(x0_weights, torch.maximum(snr.clamp(max=5.0), torch.tensor(0.05)))
    assert torch.equal(mse_weights(TrainConfig(prediction="v"), diffusion, index), torch.ones(5))  # plain v MSE
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="x0")


def test_the_pipeline_takes_the_prediction_from_the_model_file(trained, tmp_path):
    assert read_tiny_metadata(trained / MODEL_NAME)["prediction"] == "eps"
    outdir = tmp_path / "v"
    train(TrainConfig(steps=2, prediction="v", **MICRO), outdir, **QUIET)
    assert read_tiny_metadata(outdir / MODEL_NAME)["prediction"] == "v"
    cfg = tiny_trained_config(outdir / MODEL_NAME)
    assert cfg.scheduler.prediction is None  # the preset leaves it to the file
    assert build_pipeline(cfg, num_sampling_steps=2).sampler.prediction == "v"
    assert build_pipeline(tiny_trained_config(trained / MODEL_NAME), num_sampling_steps=2).sampler.prediction == "eps"
    asserted = cfg.replace(scheduler=dataclasses.replace(cfg.scheduler, prediction="v"))
    assert build_pipeline(asserted, num_sampling_steps=2).sampler.prediction == "v"
    with pytest.raises(ConfigError, match=r"predicts 'v'.*scheduler.prediction = 'v' or leave it out"):
        build_pipeline(cfg.replace(scheduler=dataclasses.replace(cfg.scheduler, prediction="eps")))
    with pytest.raises(ValueError, match=r"settings differ.*prediction: saved 'v', now 'eps'"):
        train(TrainConfig(steps=3, **MICRO), outdir, resume=True, **QUIET)  # resuming must keep the prediction


@pytest.mark.parametrize("scope", ["blocks", "loss"])
def test_compiled_training_matches_eager(tmp_path, monkeypatch, scope):
    """--compile with either scope trains the same function: padded text (fixed shapes, no host sync) instead of
    packed, compiled blocks or one compiled loss graph. aot_eager runs the eager kernels, so only the attention's
    summation order differs; inductor itself is what the GPU runs."""
    real_compile = torch.compile
    compiled_fns, compile_kwargs = [], []

    def aot_eager_compile(fn, **kwargs):  # nn.Module.compile calls torch.compile too
        compiled_fns.append(fn)
        compile_kwargs.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch._dynamo.reset()
    eager = train(TrainConfig(steps=2, **MICRO), tmp_path / "eager", **QUIET)
    mode = "reduce-overhead" if scope == "loss" else "default"  # CUDA graphs: a no-op on the CPU, but the same call
    compiled = train(TrainConfig(steps=2, compile=True, compile_scope=scope, compile_mode=mode, **MICRO),
                     tmp_path / scope, **QUIET)
    torch._dynamo.reset()
    assert compiled.module.dit.static_block_inputs and not eager.module.dit.static_block_inputs
    assert len(compiled_fns) == (MICRO["depth"] if scope == "blocks" else 1)
    assert all(kwargs["mode"] == mode for kwargs in compile_kwargs)
    for a, b in zip(eager.log, compiled.log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["mse"] == pytest.approx(b["mse"], rel=1e-4)
    with pytest.raises(ValueError, match="compile_scope"):
        TrainConfig(compile_scope="model")
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile_mode="max-speed")


def test_a_training_forward_checks_the_text_mask_without_waiting():
    state = new_state(TrainConfig(**MICRO), torch.device("cpu"))
    dit = state.module.dit.train()
    dit.static_block_inputs = True
    y = torch.randn(2, 1, dit.y_embedder.y_embedding.shape[0], 16)
    mask = torch.ones(2, y.shape[2], dtype=torch.long)
    mask[1] = 0
    with pytest.raises(RuntimeError, match="valid text token"):  # torch._assert_async: raises at once on the CPU
        dit._pad_text(y, mask, wait_for_check=False)
    with pytest.raises(ValueError, match="valid text token"):
        dit._pad_text(y, mask)


def test_lr_schedules():
    constant = TrainConfig(lr=1e-3, warmup_steps=10, steps=110)
    assert lr_at(constant, 0) == pytest.approx(1e-4) and lr_at(constant, 9) == lr_at(constant, 100) == 1e-3
    cosine = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine", lr_final_ratio=0.1)
    assert lr_at(cosine, 0) == lr_at(constant, 0) and lr_at(cosine, 10) == pytest.approx(1e-3)
    assert lr_at(cosine, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and floor
    assert lr_at(cosine, 110) == lr_at(cosine, 500) == pytest.approx(1e-4)
    rates = [lr_at(cosine, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    for bad in (dict(lr_schedule="linear"), dict(lr_final_ratio=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_factor_word_slices_match_every_caption():
    for text in shapes.all_caption_list():
        words = text.split()
        attrs = shapes.parse(text)
        colour, shape, motion, background = (words[slice(*shapes.FACTOR_WORD_SLICES[k])]
                                             for k in ("colour", "shape", "motion", "background"))
        assert colour == [attrs["colour"]] and shape == [attrs["shape"]] and background == [attrs["background"]]
        assert motion == (["standing", "still"] if attrs["motion"] == "static" else ["moving", attrs["motion"]])


def test_word_dropout_hides_whole_factors_at_the_asked_rate():
    module = build_tiny_model(TrainConfig(**MICRO))
    _, mask = caption_token_table(module, "cpu")
    mask = mask[torch.zeros(4000, dtype=torch.long)]  # one caption, 4000 times
    torch.manual_seed(0)
    kept = drop_caption_words(mask, 0.3)
    assert kept.dtype == mask.dtype and torch.equal(mask[0], caption_token_table(module, "cpu")[1][0])
    hidden = mask - kept  # 1 where a word was hidden
    assert hidden.min() == 0
    factor_positions = set()
    for start, stop in shapes.FACTOR_WORD_SLICES.values():
        block = hidden[:, start:stop]
        assert (block == block[:, :1]).all()  # a factor's words go together
        assert block[:, 0].float().mean().item() == pytest.approx(0.3, abs=0.03)
        factor_positions.update(range(start, stop))
    others = [i for i in range(mask.shape[1]) if i not in factor_positions]
    assert hidden[:, others].sum() == 0  # "a", "on", "background", the end token and padding stay as they were
    assert torch.equal(drop_caption_words(mask, 0.0), mask)
    with pytest.raises(ValueError, match="word_dropout"):
        TrainConfig(word_dropout=1.0)


def test_math_attention_trains_the_same_function():
    """--attention math (matmuls + float32 softmax) gives the same loss as SDPA, padded text mask included."""
    losses = {}
    for core in ("sdpa", "math"):
        torch.manual_seed(0)
        cfg = TrainConfig(**{**MICRO, "attention": core, "word_dropout": 0.3})
        state = new_state(cfg, torch.device("cpu"))
        state.module.dit.static_block_inputs = True  # the compiled trainer's padded-text path (key mask)
        assert {b.cross_attn.core for b in state.module.dit.blocks} == {core}
        ids, mask = caption_token_table(state.module, "cpu")
        diffusion = IDDPM(num_sampling_steps=1000).to("cpu")
        losses[core] = [train_step(state, diffusion, ids, mask, autocast=False)["loss"].item() for _ in range(3)]
    assert losses["math"] == pytest.approx(losses["sdpa"], rel=1e-4)
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="flash")


def test_iddpm_to_moves_every_schedule_array():
    diffusion = IDDPM(num_sampling_steps=1000).to("meta")
    arrays = dataclasses.asdict(diffusion.schedule)
    assert arrays and all(value.device.type == "meta" for value in arrays.values())
    assert diffusion.timestep_map.device.type == "meta"
