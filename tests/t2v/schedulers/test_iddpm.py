"""IDDPM / DDIM sampler against OpenSora v1.0's fixtures (../shared/fixtures/opensora_v1/iddpm)."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from t2v.schedulers.iddpm import IDDPM, cfg_combine, space_timesteps

ARRAYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
          "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return load_file(str(fixtures_dir / "iddpm" / "iddpm.safetensors"))


@pytest.fixture(scope="module")
def golden_json(fixtures_dir):
    return json.loads((fixtures_dir / "iddpm" / "iddpm.json").read_text())


@pytest.mark.parametrize("steps", [100, 20])
def test_timestep_map(golden, golden_json, steps):
    sampler = IDDPM(num_sampling_steps=steps)
    assert torch.equal(sampler.timestep_map, golden[f"steps{steps}.timestep_map"])
    assert sampler.timestep_map.tolist() == golden_json[f"steps{steps}"]["timestep_map_ascending"]
    assert space_timesteps(1000, steps) == sampler.timestep_map.tolist()


@pytest.mark.parametrize("steps", [100, 20])
@pytest.mark.parametrize("name", ARRAYS)
def test_schedule_arrays(golden, steps, name):
    ours = getattr(IDDPM(num_sampling_steps=steps).schedule, name)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, golden[f"steps{steps}.{name}"], rtol=1e-13, atol=1e-15)


def _float32_coefficients(sampler: IDDPM) -> IDDPM:
    """The reference's `_extract_into_tensor` rounds every coefficient to float32 (`.float()`)."""
    rounded = {f.name: getattr(sampler.schedule, f.name) for f in dataclasses.fields(sampler.schedule)}
    rounded = {k: v.float().double() if v.is_floating_point() else v for k, v in rounded.items()}
    sampler.schedule = dataclasses.replace(sampler.schedule, **rounded)
    return sampler


@pytest.mark.parametrize("case,index", [(0, 99), (1, 50), (2, 0)])
def test_p_mean_variance(golden, golden_json, case, index):
    assert golden_json[f"pmv{case}"]["index"] == index
    x_t, model_output = golden["pmv.x_t"], golden[f"pmv{case}.model_output"]
    out = IDDPM(100).p_mean_variance(model_output, x_t, index)
    # float64 coefficients: equal to the reference up to its float32 rounding of the coefficients ...
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        torch.testing.assert_close(out[key], golden[f"pmv{case}.{key}"], rtol=1e-5, atol=1e-5)
    # ... and bit-exact once the coefficients are rounded as the reference does.
    exact = _float32_coefficients(IDDPM(100)).p_mean_variance(model_output, x_t, index)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        torch.testing.assert_close(exact[key], golden[f"pmv{case}.{key}"], rtol=1e-15, atol=1e-15)


def test_p_sample_step(golden, golden_json):
    index = golden_json["step"]["index"]
    x_prev = IDDPM(100).p_sample_step(golden["pmv1.model_output"], golden["pmv.x_t"], index, golden["step.noise"])
    torch.testing.assert_close(x_prev, golden["step.x_prev"], rtol=2e-6, atol=1e-6)


def test_p_sample_step_adds_no_noise_at_index_0(golden):
    sampler = IDDPM(100)
    x_t, out = golden["pmv.x_t"], golden["pmv2.model_output"]
    x_prev = sampler.p_sample_step(out, x_t, 0, torch.randn_like(x_t))
    assert torch.equal(x_prev, sampler.p_mean_variance(out, x_t, 0)["mean"])


def test_cfg_combine(golden, golden_json):
    assert torch.equal(golden["cfg.model_input"], torch.cat([golden["cfg.x"][:2]] * 2))
    combined = cfg_combine(golden["cfg.model_out"], golden_json["cfg"]["cfg_scale"])
    torch.testing.assert_close(combined, golden["cfg.combined"], rtol=0, atol=1e-15)


def test_cfg_combine_all_channels():
    out = torch.randn(4, 8, 2, 3, 3)
    combined = cfg_combine(out, 4.0, guided_channels=None)
    cond, uncond = out[:2, :4], out[2:, :4]
    torch.testing.assert_close(combined[:2, :4], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(combined[2:, :4], combined[:2, :4])
    assert torch.equal(combined[:, 4:], out[:, 4:])


@pytest.mark.parametrize("index", [99, 37, 0])
def test_ddim_step_formula(golden, index):
    x_t, model_output = golden["pmv.x_t"], golden["pmv1.model_output"]
    alpha_bar = golden["steps100.alphas_cumprod"][index].item()
    alpha_bar_prev = golden["steps100.alphas_cumprod_prev"][index].item()
    eps = model_output[:, :4]
    x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
    expected = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
    torch.testing.assert_close(IDDPM(100, sampler="ddim").ddim_step(model_output, x_t, index), expected,
                               rtol=1e-12, atol=1e-12)


class ToyDenoiser(nn.Module):
    """Row-independent stand-in for STDiT: [N, 4, T, H, W] -> [N, 8, T, H, W], using t, y and mask."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv3d(4, 8, kernel_size=1)
        self.text = nn.Linear(6, 8)
        self.calls = []

    def forward(self, x, timestep, y, mask=None):
        self.calls.append({"batch": x.shape[0], "timestep": timestep.clone(), "mask": mask})
        y = y.squeeze(1)  # [N, L, Cc]
        weights = torch.ones(y.shape[:2]) if mask is None else mask.to(y.dtype)
        text = self.text((y * weights[..., None]).sum(1) / weights.sum(1, keepdim=True))  # [N, 8]
        out = self.mix(x) + text[:, :, None, None, None] + timestep.to(x.dtype)[:, None, None, None, None] / 1000
        return torch.cat([out[:, :4], torch.tanh(out[:, 4:])], dim=1)


def _inputs(batch=2, length=5):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(batch, 4, 2, 4, 4, generator=gen)
    y = torch.randn(batch, 1, length, 6, generator=gen)
    y_null = torch.randn(1, 1, length, 6, generator=gen).expand(batch, -1, -1, -1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch]
    return z, y, y_null, mask


def _run(sampler, model, seed=0, mask=True, on_step=None):
    z, y, y_null, text_mask = _inputs()
    return sampler.sample(model, z, y, text_mask if mask else None, y_null=y_null,
                          generator=torch.Generator().manual_seed(seed), progress=False, on_step=on_step)


@pytest.mark.parametrize("kind", ["iddpm", "ddim"])
def test_sampling_deterministic_and_on_step(kind):
    model = ToyDenoiser()
    sampler = IDDPM(num_sampling_steps=10, cfg_scale=4.0, sampler=kind)
    seen = []
    first = _run(sampler, model, on_step=lambda *args: seen.append(args))
    assert first.shape == (2, 4, 2, 4, 4) and torch.isfinite(first).all()
    torch.testing.assert_close(_run(sampler, model), first, rtol=0, atol=0)
    if kind == "iddpm":
        assert not torch.equal(_run(sampler, model, seed=1), first)

    assert [s[0] for s in seen] == list(range(10))
    expected_timesteps = sampler.timestep_map.flip(0).tolist()
    assert [s[1].tolist() for s in seen] == [[t] * 4 for t in expected_timesteps]
    assert all(s[1].dtype == torch.int64 for s in seen)
    z, y, y_null, mask = _inputs()
    step, timestep, x_in, y_in, mask_in = seen[0]
    torch.testing.assert_close(x_in, torch.cat([z, z]))
    torch.testing.assert_close(y_in, torch.cat([y, y_null]))
    assert torch.equal(mask_in, torch.cat([mask, mask]))
    # the model sees exactly what on_step saw: one joint call of 2B rows per step
    runs = 3 if kind == "iddpm" else 2
    assert len(model.calls) == runs * 10 and all(c["batch"] == 4 for c in model.calls)


@pytest.mark.parametrize("kind", ["iddpm", "ddim"])
@pytest.mark.parametrize("mask", [True, False])
def test_cfg_split_equals_joint(kind, mask):
    model = ToyDenoiser()
    joint = _run(IDDPM(8, sampler=kind), model, mask=mask)
    model.calls.clear()
    split = _run(IDDPM(8, sampler=kind, cfg_split=True), model, mask=mask)
    torch.testing.assert_close(split, joint, rtol=1e-6, atol=1e-6)
    assert len(model.calls) == 16 and all(c["batch"] == 2 for c in model.calls)
    if mask:
        assert all(torch.equal(c["mask"], _inputs()[3]) for c in model.calls)


def test_iddpm_sampling_matches_reference_loop():
    """The released loop keeps a 2B-row state, draws randn_like on it at every step and returns the cond half."""
    model = ToyDenoiser()
    sampler = IDDPM(num_sampling_steps=6, cfg_scale=7.0)
    z, y, y_null, mask = _inputs()
    gen = torch.Generator().manual_seed(5)
    state = torch.cat([z, z])
    for index in range(5, -1, -1):
        half = state[: len(state) // 2]
        timestep = torch.full((4,), int(sampler.timestep_map[index]))
        out = cfg_combine(model(torch.cat([half, half]), timestep, torch.cat([y, y_null]), mask=torch.cat([mask, mask])), 7.0)
        noise = torch.randn(state.shape, generator=gen)
        state = sampler.p_sample_step(out, state, index, noise)
    expected = state.chunk(2)[0]
    ours = sampler.sample(model, z, y, mask, y_null=y_null, generator=torch.Generator().manual_seed(5), progress=False)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_iddpm_sampling_on_cuda_with_the_pipelines_cpu_generator():
    """The pipeline seeds a CPU generator; on CUDA the noise is drawn on the CPU and moved, so the GPU run follows
    the CPU run (stage 2 / calibration capture on a GPU raised "Expected a 'cuda' device type" before)."""
    model = ToyDenoiser()
    cpu = _run(IDDPM(num_sampling_steps=6, cfg_scale=4.0), model)
    model.cuda()
    z, y, y_null, mask = (t.cuda() for t in _inputs())
    sampler = IDDPM(num_sampling_steps=6, cfg_scale=4.0)  # schedule left on the CPU, as the pipeline builds it
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the toy's Conv3d in full float32
        out = sampler.sample(model, z, y, mask, y_null=y_null, generator=torch.Generator().manual_seed(0),
                             progress=False)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-4)


def _gaussian_kl(mean_p, var_p, mean_q, var_q):
    p = torch.distributions.Normal(mean_p, var_p.sqrt())
    q = torch.distributions.Normal(mean_q, var_q.sqrt())
    return torch.distributions.kl_divergence(p, q)


def test_training_losses():
    torch.manual_seed(0)
    diffusion = IDDPM(num_sampling_steps=1000)
    assert torch.equal(diffusion.timestep_map, torch.arange(1000))
    x_start = torch.rand(3, 4, 2, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x_start)
    index = torch.tensor([999, 400, 1])
    model_output = torch.randn(3, 8, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    received = {}

    def model(x_t, timestep, **kwargs):
        received.update(x_t=x_t, timestep=timestep, **kwargs)
        return model_output * 1.0

    terms = diffusion.training_losses(model, x_start, index, model_kwargs={"y": "text"}, noise=noise)
    assert received["y"] == "text" and torch.equal(received["timestep"], index)
    assert all(torch.isfinite(terms[k]).all() and terms[k].shape == (3,) for k in ("loss", "mse", "vb"))
    eps, var_values = model_output[:, :4], model_output[:, 4:]
    torch.testing.assert_close(terms["mse"], ((eps - noise) ** 2).mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    # Independent VLB: the 1000-step process from scratch, closed-form posterior, torch.distributions KL.
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = []
    for row, t in enumerate(index.tolist()):
        a_t, a_prev, beta = alpha_bar[t], alpha_bar[t - 1], betas[t]
        x_t = a_t.sqrt() * x_start[row] + (1 - a_t).sqrt() * noise[row]
        posterior_var = beta * (1 - a_prev) / (1 - a_t)
        true_mean = (a_prev.sqrt() * beta * x_start[row] + (1 - a_prev) * (1 - beta).sqrt() * x_t) / (1 - a_t)
        x0_hat = (x_t - (1 - a_t).sqrt() * eps[row]) / a_t.sqrt()
        model_mean = (a_prev.sqrt() * beta * x0_hat + (1 - a_prev) * (1 - beta).sqrt() * x_t) / (1 - a_t)
        frac = (var_values[row] + 1) / 2
        model_var = torch.exp(frac * beta.log() + (1 - frac) * posterior_var.log())
        kl = _gaussian_kl(true_mean, posterior_var.expand_as(true_mean), model_mean, model_var)
        expected.append(kl.mean() / torch.log(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(terms["vb"], torch.stack(expected).detach(), rtol=1e-10, atol=1e-12)

    # The VLB term trains the variance channels only.
    terms["vb"].sum().backward()
    assert torch.count_nonzero(model_output.grad[:, :4]) == 0
    assert torch.count_nonzero(model_output.grad[:, 4:]) > 0


def test_training_losses_decoder_nll_at_index_0():
    diffusion = IDDPM(num_sampling_steps=1000)
    x_start = torch.rand(2, 4, 1, 2, 2) * 2 - 1
    terms = diffusion.training_losses(lambda x, t: torch.zeros(2, 8, 1, 2, 2), x_start, torch.tensor([0, 0]))
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] > 0).all()


def test_q_sample():
    diffusion = IDDPM(num_sampling_steps=1000)
    x_start, noise = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    alpha_bar = diffusion.schedule.alphas_cumprod[[10, 900]].float().view(2, 1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x_start + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x_start, torch.tensor([10, 900]), noise), expected)


def test_bad_sampler_name():
    with pytest.raises(ValueError, match="sampler"):
        IDDPM(sampler="euler")


def test_training_losses_clamp_variance_bounds_the_vlb_input():
    diffusion = IDDPM(num_sampling_steps=1000)
    gen = torch.Generator().manual_seed(0)
    x_start = torch.rand(2, 4, 1, 2, 2, generator=gen) * 2 - 1
    noise = torch.randn(x_start.shape, generator=gen)
    index = torch.tensor([0, 300])
    eps = torch.randn(x_start.shape, generator=gen)

    def model_with(v):
        return lambda x, t: torch.cat([eps, torch.full_like(eps, v)], dim=1)

    for v in (1e4, -1e4):  # far outside [-1, 1]: clamped, the loss equals the bound's
        huge = diffusion.training_losses(model_with(v), x_start, index, noise=noise, clamp_variance=True)
        at_bound = diffusion.training_losses(model_with(1.0 if v > 0 else -1.0), x_start, index, noise=noise)
        torch.testing.assert_close(huge["vb"], at_bound["vb"])
        torch.testing.assert_close(huge["mse"], at_bound["mse"])
    unclamped = diffusion.training_losses(model_with(-1e4), x_start, index, noise=noise)
    # a vanishing variance blows the KL up: what the clamp prevents
    assert unclamped["vb"].max() > 1e6 * at_bound["vb"].max()
    inside = diffusion.training_losses(model_with(0.3), x_start, index, noise=noise, clamp_variance=True)
    torch.testing.assert_close(inside["vb"], diffusion.training_losses(model_with(0.3), x_start, index,
                                                                         noise=noise)["vb"])


class VFromEps(nn.Module):
    """The v-prediction twin of an ε model: v = (ε − √(1−ᾱ_t)·x_t)/√ᾱ_t at the original timestep t it is given."""

    def __init__(self, eps_model: nn.Module):
        super().__init__()
        self.eps_model = eps_model
        self.alphas_cumprod = IDDPM(num_sampling_steps=1000).schedule.alphas_cumprod

    def forward(self, x, timestep, y, mask=None):
        out = self.eps_model(x, timestep, y, mask=mask)
        eps, var = out.split(x.shape[1], dim=1)
        alpha_bar = self.alphas_cumprod[timestep].to(x.dtype)[:, None, None, None, None]
        return torch.cat([(eps - (1 - alpha_bar).sqrt() * x) / alpha_bar.sqrt(), var], dim=1)


@pytest.mark.parametrize("kind", ["iddpm", "ddim"])
def test_v_prediction_samples_like_the_eps_model_it_came_from(kind):
    """A v model that is an ε model in disguise gives the same videos: sampling converts v back to ε (CFG included)."""
    model = ToyDenoiser().double()
    z, y, y_null, mask = (t.double() if t.is_floating_point() else t for t in _inputs())
    runs = []
    for prediction, net in (("eps", model), ("v", VFromEps(model))):
        sampler = IDDPM(num_sampling_steps=10, cfg_scale=4.0, sampler=kind, prediction=prediction)
        runs.append(sampler.sample(net, z, y, mask, y_null=y_null, generator=torch.Generator().manual_seed(0),
                                   progress=False))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-9, atol=1e-9)


def test_v_target_and_its_conversion_to_eps():
    """v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022), and ε is recovered from (v, x_t); the loss's mse is on v."""
    diffusion = IDDPM(num_sampling_steps=1000, prediction="v")
    gen = torch.Generator().manual_seed(0)
    x_start, noise = torch.randn(3, 4, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, 2, 4, 4, generator=gen, dtype=torch.float64)
    index = torch.tensor([0, 500, 999])
    alpha_bar = diffusion.schedule.alphas_cumprod[index][:, None, None, None, None]
    v = diffusion.target(x_start, noise, index)
    torch.testing.assert_close(v, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_start)
    x_t = diffusion.q_sample(x_start, index, noise)
    torch.testing.assert_close(diffusion.eps_from_output(v, x_t, index), noise)
    assert torch.equal(IDDPM(1000).target(x_start, noise, index), noise)  # ε prediction: the target is the noise

    def perfect(x, timestep, **kwargs):  # outputs the exact v target (and mid-range variance values)
        return torch.cat([v, torch.zeros_like(v)], dim=1)

    terms = diffusion.training_losses(perfect, x_start, index, noise=noise)
    torch.testing.assert_close(terms["mse"], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="prediction"):
        IDDPM(prediction="x0")
