"""OpenSora v1.0's IDDPM sampler (ancestral, learned-range variance) and the Q-VDiT DDIM variant.

See METHOD.md §2. Notation: the *training* process has 1000 steps with linear betas; sampling uses a
*respaced* process of N steps that keeps N evenly spaced original timesteps (`timestep_map`, ascending).
Sampling walks respaced indices N-1 ... 0 and feeds the model the original timestep `timestep_map[index]`.

CFG batch convention (used everywhere in this module): a batch of 2B rows is [cond (B rows); uncond (B rows)].
The model is run on the cond half of x duplicated, with y = [y; y_null]; see `cfg_combine` for how the
two halves' outputs are merged (the released 3-channel quirk).

All schedule arrays are float64 buffers; they are cast to the working dtype at use, like the reference's
`_extract_into_tensor`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from tqdm.auto import tqdm

SAMPLERS = ("iddpm", "ddim")
PREDICTIONS = ("eps", "v")  # what the model output's first C channels are (IDDPM prediction)


def linear_betas(num_train_steps: int = 1000) -> torch.Tensor:
    """Ho et al.'s linear schedule stretched to any length: [num_train_steps] float64, 1e-4·s ... 0.02·s, s = 1000/T."""
    scale = 1000 / num_train_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_train_steps, dtype=torch.float64)


def space_timesteps(num_train_steps: int, section_counts: int | Sequence[int]) -> list[int]:
    """Original timesteps kept by respacing, ascending (OpenSora's `space_timesteps(T, "N")` or `"N1,N2,..."`).

    The T steps are cut into len(section_counts) near-equal sections (the first `T % len` get one extra step);
    section i keeps `section_counts[i]` steps at fractional stride (size-1)/(count-1), rounded half to even
    (Python's `round`, as the reference).
    """
    counts = [section_counts] if isinstance(section_counts, int) else list(section_counts)
    size_per, extra = divmod(num_train_steps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class RespacedSchedule:
    """Every per-step array of the respaced process, [N] float64 (`timestep_map` [N] int64)."""

    timestep_map: torch.Tensor
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    log_betas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def build(cls, train_betas: torch.Tensor, kept_timesteps: Sequence[int]) -> "RespacedSchedule":
        """Respace `train_betas` [T] to the kept original timesteps: beta'_i = 1 - ᾱ(t_i)/ᾱ(t_{i-1})."""
        train_alphas_cumprod = torch.cumprod(1.0 - train_betas, dim=0)
        timestep_map = torch.tensor(sorted(kept_timesteps), dtype=torch.int64)
        alphas_cumprod = train_alphas_cumprod[timestep_map]
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at index 0, so its log is clipped to the value at index 1.
        posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        return cls(
            timestep_map=timestep_map,
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1).sqrt(),
            log_betas=betas.log(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        )


def _extract(array: torch.Tensor, index: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """array[index] cast to like's dtype/device, shaped to broadcast against `like` [B, ...].

    index: an int (same step for every row) or an int64 tensor [B] (one step per row) -> [B, 1, ..., 1].
    """
    if isinstance(index, int):
        return array[index].to(device=like.device, dtype=like.dtype)
    values = array.to(like.device)[index.to(like.device)].to(like.dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


def cfg_combine(model_out: torch.Tensor, cfg_scale: float, guided_channels: int | None = 3) -> torch.Tensor:
    """Classifier-free guidance exactly as OpenSora v1.0 releases it (fixture `iddpm/cfg.*`).

    model_out: [2B, 2C, ...], rows [cond; uncond], channels [eps (C); variance values (C)].
    Returns [2B, 2C, ...]: eps channels [0, guided_channels) become `uncond + s·(cond − uncond)` in both
    halves; the remaining eps channels and all variance channels keep each half's own values.
    guided_channels=3 is the released quirk (code written for 3-channel pixel models, METHOD.md §2);
    None guides all C eps channels.
    """
    num_guided = model_out.shape[1] // 2 if guided_channels is None else guided_channels
    guided, rest = model_out[:, :num_guided], model_out[:, num_guided:]
    cond, uncond = guided.chunk(2, dim=0)
    half = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) ‖ N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)²), elementwise (nats).

    Uses improved-DDPM's tanh approximation of the standard normal CDF; the edge bins extend to ±inf.
    """
    def standard_normal_cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_over_non_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.dim())))


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


class IDDPM:
    """OpenSora v1.0's IDDPM: linear betas, learned-range variance, epsilon prediction, respaced to N steps.

    Args:
        num_sampling_steps: N, the respaced length (100 in the papers; 20 in Q-VDiT's short configs;
            num_train_steps means no respacing, which is what training uses).
        cfg_scale: classifier-free guidance scale s (7.0 OpenSora, 4.0 Q-VDiT quant configs).
        sampler: "iddpm" (ancestral `p_sample`, OpenSora inference) or "ddim" (η = 0, Q-VDiT pipeline).
        cfg_split: run the cond and uncond halves as two forwards of B rows instead of one of 2B rows
            (Q-VDiT's pipeline; numerically the same for a row-independent model).
        cfg_guided_channels: eps channels that CFG guides; 3 is the released quirk, None guides all.
        num_train_steps: length of the original process (1000).
        prediction: what the model's first C channels are: "eps" (OpenSora) or "v" = √ᾱ·ε − √(1−ᾱ)·x0
            (Salimans & Ho 2022; an option of the tiny model, which at high noise must otherwise reproduce x_t
            to a fraction of a percent before it can express any x0). Sampling converts v to ε, so the
            samplers, CFG and the learned variance are unchanged.
    """

    def __init__(self, num_sampling_steps: int = 100, cfg_scale: float = 7.0, sampler: str = "iddpm",
                 cfg_split: bool = False, cfg_guided_channels: int | None = 3, num_train_steps: int = 1000,
                 prediction: str = "eps"):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.sampler = sampler
        self.cfg_split = cfg_split
        self.cfg_guided_channels = cfg_guided_channels
        self.num_train_steps = num_train_steps
        kept = space_timesteps(num_train_steps, num_sampling_steps)
        self.schedule = RespacedSchedule.build(linear_betas(num_train_steps), kept)

    def to(self, device: torch.device | str) -> "IDDPM":
        """Move the schedule's arrays to `device` (in place; returns self). A trainer on a GPU then indexes them
        there: a host-to-device copy per step would block the host until the device is idle. Same numbers."""
        self.schedule = replace(self.schedule, **{f.name: getattr(self.schedule, f.name).to(device)
                                                  for f in fields(self.schedule)})
        return self

    @property
    def timestep_map(self) -> torch.Tensor:
        """[N] int64: the original timestep of each respaced index, ascending."""
        return self.schedule.timestep_map

    # ---- the forward process -------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, index: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·noise. x_start, noise: [B, C, ...]; index: int or int64 [B]."""
        s = self.schedule
        return _extract(s.sqrt_alphas_cumprod, index, x_start) * x_start \
            + _extract(s.sqrt_one_minus_alphas_cumprod, index, x_start) * noise

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, index: int | torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each shaped like x_t."""
        s = self.schedule
        mean = _extract(s.posterior_mean_coef1, index, x_t) * x_start + _extract(s.posterior_mean_coef2, index, x_t) * x_t
        variance = _extract(s.posterior_variance, index, x_t).expand_as(x_t)
        log_variance = _extract(s.posterior_log_variance_clipped, index, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ---- one reverse step from a given model output --------------------------------------------------

    def eps_from_output(self, output: torch.Tensor, x_t: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """The ε prediction from the model's first C channels [B, C, ...]: itself, or ε = √ᾱ·v + √(1−ᾱ)·x_t."""
        if self.prediction == "eps":
            return output
        s = self.schedule
        return _extract(s.sqrt_alphas_cumprod, index, x_t) * output + _extract(s.sqrt_one_minus_alphas_cumprod, index, x_t) * x_t

    def target(self, x_start: torch.Tensor, noise: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """What the first C output channels should be: noise (ε) or v = √ᾱ·noise − √(1−ᾱ)·x_start."""
        if self.prediction == "eps":
            return noise
        s = self.schedule
        return _extract(s.sqrt_alphas_cumprod, index, x_start) * noise \
            - _extract(s.sqrt_one_minus_alphas_cumprod, index, x_start) * x_start

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, index: int | torch.Tensor) -> dict:
        """p(x_{t-1} | x_t) from the model output (learned-range variance, no clipping).

        model_output: [B, 2C, ...] = [mean output (C): ε, or v-prediction converted by `eps_from_output`;
        variance values u (C), u ∈ [-1, 1]]; x_t: [B, C, ...]; index: int or int64 [B].
        log variance = frac·log β + (1 − frac)·log β̃_clipped with frac = (u + 1)/2.
        Returns dict(mean, variance, log_variance, pred_xstart), each [B, C, ...], in the promoted dtype.
        """
        dtype = torch.promote_types(model_output.dtype, x_t.dtype)
        x_t = x_t.to(dtype)
        mean_output, var_values = model_output.to(dtype).split(x_t.shape[1], dim=1)
        eps = self.eps_from_output(mean_output, x_t, index)
        s = self.schedule
        min_log = _extract(s.posterior_log_variance_clipped, index, x_t)
        max_log = _extract(s.log_betas, index, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = _extract(s.sqrt_recip_alphas_cumprod, index, x_t) * x_t \
            - _extract(s.sqrt_recipm1_alphas_cumprod, index, x_t) * eps
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, index)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample_step(self, model_output: torch.Tensor, x_t: torch.Tensor, index: int,
                      noise: torch.Tensor) -> torch.Tensor:
        """Ancestral step x_{t-1} = mean + exp(½·log_variance)·noise (no noise at index 0). Shapes as x_t."""
        out = self.p_mean_variance(model_output, x_t, index)
        if index == 0:
            return out["mean"]
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise.to(out["mean"].dtype)

    def ddim_step(self, model_output: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        """DDIM (η = 0) on the respaced ᾱ, eps = model_output[:, :C]:

        x̂0 = (x_t − √(1−ᾱ_t)·eps)/√ᾱ_t,  x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·eps.  Shapes as x_t.
        """
        dtype = torch.promote_types(model_output.dtype, x_t.dtype)
        x_t = x_t.to(dtype)
        eps = self.eps_from_output(model_output[:, : x_t.shape[1]].to(dtype), x_t, index)
        alpha_bar = _extract(self.schedule.alphas_cumprod, index, x_t)
        alpha_bar_prev = _extract(self.schedule.alphas_cumprod_prev, index, x_t)
        pred_xstart = (x_t - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)
        return torch.sqrt(alpha_bar_prev) * pred_xstart + torch.sqrt(1 - alpha_bar_prev) * eps

    # ---- the sampling loop ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model: Callable, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None, *,
               y_null: torch.Tensor, generator: torch.Generator | None = None, progress: bool = True,
               on_step: StepCallback | None = None) -> torch.Tensor:
        """Denoise z with classifier-free guidance; returns the cond half's x_0 latents [B, C, T, H, W].

        Args:
            model: called as `model(x [2B, C, T, H, W], timestep [2B] int64, y [2B, 1, L, Cc], mask=mask)`
                and returning [2B, 2C, T, H, W] (with `cfg_split`: twice, on the B-row halves).
            z: initial noise [B, C, T, H, W], one draw per prompt; the state x_t is kept for the cond half
                only (the reference's uncond rows are overwritten by the cond rows before every forward).
            y: cond text embedding [B, 1, L, Cc]; y_null: null embedding [B, 1, L, Cc]; y_in = [y; y_null].
            mask: text mask [B, L] int64 or None. Duplicated to [mask; mask]: OpenSora passes the cond
                mask and the model repeats it for the uncond rows, so the null caption is truncated to each
                prompt's token count.
            generator: source of the ancestral noise ("iddpm"); unused by "ddim". Noise [2B, ...] is drawn at
                every step, index 0 included, as the reference's `randn_like` on the 2B batch, and rows [0, B)
                are used.
            progress: show a tqdm bar over the N steps.
            on_step: `on_step(step, timestep, x_in, y_in, mask_in)`, called once per step right before the
                model call(s) of that step: step = 0 ... N-1 in sampling order (respaced index N-1-step),
                timestep = the int64 [2B] original timesteps given to the model, x_in [2B, C, T, H, W],
                y_in [2B, 1, L, Cc], mask_in [2B, L] or None: exactly the model's joint-batch inputs (with
                `cfg_split` the model then sees rows [0, B) and [B, 2B) in two calls).
        Timesteps are int64, as the reference's `_WrappedModel` passes them; the model casts them itself.
        """
        batch = z.shape[0]
        y_in = torch.cat([y, y_null.to(y.dtype)], dim=0)
        mask_in = None if mask is None else torch.cat([mask, mask], dim=0)
        x = z
        indices = range(self.num_sampling_steps - 1, -1, -1)
        for step, index in enumerate(tqdm(indices, disable=not progress, desc=f"{self.sampler} sampling")):
            timestep = torch.full((2 * batch,), int(self.timestep_map[index]), dtype=torch.int64, device=z.device)
            x_in = torch.cat([x, x], dim=0)
            if on_step is not None:
                on_step(step, timestep, x_in, y_in, mask_in)
            model_out = self._forward(model, x_in, timestep, y_in, mask_in)
            combined = cfg_combine(model_out, self.cfg_scale, self.cfg_guided_channels)[:batch]
            if self.sampler == "ddim":
                x = self.ddim_step(combined, x, index)
            else:
                # drawn where the generator lives (the pipeline's CPU generator: the same noise on any device)
                noise_device = z.device if generator is None else generator.device
                noise = torch.randn(x_in.shape, generator=generator, device=noise_device, dtype=x_in.dtype).to(z.device)
                x = self.p_sample_step(combined, x, index, noise[:batch])
        return x

    def _forward(self, model, x_in, timestep, y_in, mask_in) -> torch.Tensor:
        """One joint forward of 2B rows, or (cfg_split) two forwards of B rows concatenated: [2B, 2C, ...]."""
        if not self.cfg_split:
            return model(x_in, timestep, y_in, mask=mask_in)
        halves = []
        for rows in (slice(0, len(x_in) // 2), slice(len(x_in) // 2, None)):
            half_mask = None if mask_in is None else mask_in[rows]
            halves.append(model(x_in[rows], timestep[rows], y_in[rows], mask=half_mask))
        return torch.cat(halves, dim=0)

    # ---- training --------------------------------------------------------------------------------------

    def training_losses(self, model: Callable, x_start: torch.Tensor, index: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        clamp_variance: bool = False) -> dict:
        """Improved-DDPM loss with learned sigma (loss_type MSE): per-sample terms, each [B].

        x_start: [B, C, ...]; index: int64 [B] step indices of this process (use num_sampling_steps =
        num_train_steps for the full 1000-step process); the model is called as
        `model(x_t, timestep_map[index], **model_kwargs)` -> [B, 2C, ...].
        Returns dict(mse = mean((output − target)²) with target = noise (ε) or v (see `target`), vb = VLB term
        in bits with the mean output detached
        (KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)), or the decoder NLL at index 0), loss = mse + vb).
        clamp_variance: clamp the variance values v to [-1, 1] in the VLB term (not in OpenSora). Unclamped, v
        extrapolates beyond [log β̃, log β]: the tiny model's v reached 26 at t = 0 and its loss then overflowed.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, index, noise)
        timestep = self.timestep_map.to(index.device)[index]
        model_output = model(x_t, timestep, **(model_kwargs or {}))
        mean_output, var_values = model_output.split(x_start.shape[1], dim=1)
        # The VLB term learns the variance only: it must not move the mean (eps or v) prediction.
        if clamp_variance:
            var_values = var_values.clamp(-1.0, 1.0)
        frozen = torch.cat([mean_output.detach(), var_values], dim=1)
        vb = self._vb_terms_bits(frozen, x_start, x_t, index)
        mse = _mean_over_non_batch((self.target(x_start, noise, index) - mean_output) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_terms_bits(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                       index: torch.Tensor) -> torch.Tensor:
        """[B] VLB term in bits per dim: the KL to the true posterior, or the decoder NLL where index == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, index)
        out = self.p_mean_variance(model_output, x_t, index)
        kl = _mean_over_non_batch(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = _mean_over_non_batch(decoder_nll)
        return torch.where(index.to(kl.device) == 0, decoder_nll, kl) / math.log(2.0)
