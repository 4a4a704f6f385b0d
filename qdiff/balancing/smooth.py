"""Static channel smoothing (SmoothQuant-style), the "static" half of ViDiT-Q's
static-dynamic channel balancing (METHOD.md §6).

For a linear layer y = x · Wᵀ with x: [..., d_in] and W: [d_out, d_in], a per-input-channel
scale s: [d_in] moves outliers from activations into weights without changing the output:

    y = (x / s) · (W · s)ᵀ          (W · s scales column j of W by s_j)

    s_j = max|X_j|^α / max|W_j|^(1−α)

where max|X_j| is a calibration statistic of input channel j (see `ChannelStats`) and max|W_j|
the absolute maximum of weight column j.

Clamping, as the reference (Q-VDiT / ViDiT-Q `QuantLayer.forward`) does it and where we differ:
- activation statistic: the reference replaces entries that are exactly 0 by 1e-5 before the
  power (a channel that is always zero would otherwise give s_j = 0 and x/s = nan). We clamp
  every entry to at least `eps` (1e-5), which is the same for zeros and only differs for
  statistics in (0, 1e-5), where the reference's s_j is tiny and the division explodes.
- weight column max: the reference does not clamp it (an all-zero weight column gives
  s_j = inf). We clamp it to at least `eps` as well.
- s itself is not clamped by either.
"""
from __future__ import annotations

import torch

__all__ = ["smooth_scales", "ChannelStats"]


def smooth_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing scales s = max|X|^α / max|W|^(1−α).

    Args:
        act_absmax: [d_in] non-negative activation statistic per input channel.
        weight: [d_out, d_in] the linear layer's weight (the original, un-scaled one).
        alpha: migration strength in [0, 1]; 0 puts all the difficulty on the weights'
            side (s = 1/max|W|), 1 all on the activations' side (s = max|X|).
        eps: lower clamp of both statistics (see the module docstring).

    Returns:
        s: [d_in] in float32 (the statistics are computed in float32 whatever the input
        dtypes), on `weight`'s device. Use it as x / s and W * s.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [d_out, d_in], got shape {tuple(weight.shape)}")
    d_in = weight.shape[1]
    if act_absmax.shape != (d_in,):
        raise ValueError(
            f"act_absmax must be [d_in] = [{d_in}] to match weight {tuple(weight.shape)}, "
            f"got {tuple(act_absmax.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = act_absmax.detach().to(device=weight.device, dtype=torch.float32).clamp_min(eps)
    weight_absmax = weight.detach().float().abs().amax(dim=0).clamp_min(eps)  # [d_in]
    return act.pow(alpha) / weight_absmax.pow(1.0 - alpha)


class ChannelStats:
    """Momentum running average of a per-input-channel activation statistic.

    Per batch, the statistic of an input x: [..., N, d_in] is, as in the reference, the
    absolute maximum over the token axis (dim −2) averaged over all leading axes:
    `x.abs().amax(-2)` → [..., d_in] → mean → [d_in]. A 2-D input [N, d_in] counts as one
    sample (its column-wise absmax) and a 1-D input [d_in] is its own absolute value.
    (The reference code takes `.mean(dim=0)` after the max, which for its 3-D inputs is the
    same thing.) With `reduction="max"` the batch statistic is instead the plain absmax over
    all leading axes, as SmoothQuant defines it.

    The first batch initialises the running value; every later batch b updates it as
        running = momentum · running + (1 − momentum) · b
    (reference: `momentum_act_max`, momentum 0.95).
    """

    REDUCTIONS = ("token_max_mean", "max")

    def __init__(self, momentum: float = 0.95, reduction: str = "token_max_mean"):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"reduction must be one of {self.REDUCTIONS}, got {reduction!r}")
        self.momentum = momentum
        self.reduction = reduction
        self.absmax: torch.Tensor | None = None  # [d_in] float32 once updated
        self.num_updates = 0

    def batch_statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The per-batch statistic [d_in] (float32) of x: [..., d_in]; see the class docstring."""
        x = x.detach().float().abs()
        if x.dim() == 1:
            return x
        if self.reduction == "max":
            return x.reshape(-1, x.shape[-1]).amax(dim=0)
        per_sample = x.amax(dim=-2)  # [..., N, d_in] -> [..., d_in]
        return per_sample.reshape(-1, x.shape[-1]).mean(dim=0)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Fold one batch x: [..., d_in] into the running statistic; returns it ([d_in])."""
        current = self.batch_statistic(x)
        if self.absmax is None:
            self.absmax = current.clone()
        else:
            if current.shape != self.absmax.shape:
                raise ValueError(
                    f"channel count changed: running statistic has {self.absmax.shape[0]} "
                    f"channels, batch has {current.shape[0]}"
                )
            current = current.to(self.absmax.device)
            self.absmax = self.momentum * self.absmax + (1.0 - self.momentum) * current
        self.num_updates += 1
        return self.absmax

    def scales(self, weight: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
        """`smooth_scales` from the running statistic; raises if no batch was seen."""
        if self.absmax is None:
            raise RuntimeError("ChannelStats.scales called before any update()")
        return smooth_scales(self.absmax, weight, alpha, eps)
