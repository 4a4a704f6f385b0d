"""TMD (Temporal Maintenance Distillation) losses, METHOD.md §5.

  L = MSE(pred, tgt) + λ · KL( softmax(S_tgt) ‖ softmax(S_pred) ),   λ = 100
S [B, T, T] is the cosine similarity between the T frame vectors of a model output
[B, C, T, H, W]; rows are softmaxed and the KL is averaged over all B·T·T entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_similarity(x: torch.Tensor, reference_layout: bool = False) -> torch.Tensor:
    """Cosine similarity between frames: x [B, C, T, H, W] -> S [B, T, T].

    True frames are x[:, :, t] flattened over C·H·W. `reference_layout=True` reproduces the
    reference, which takes `reshape(B, T, -1)` of the [B, C, T, H, W] tensor and so mixes
    channel blocks and frames (METHOD.md §5 quirk).
    """
    if x.dim() != 5:
        raise ValueError(f"frame_similarity expects x [B, C, T, H, W], got shape {tuple(x.shape)}")
    batch, frames = x.shape[0], x.shape[2]
    if reference_layout:
        vectors = x.reshape(batch, frames, -1)  # [B, C, T, H, W] read as [B, T, C*T*H*W / T]
    else:
        vectors = x.permute(0, 2, 1, 3, 4).reshape(batch, frames, -1)  # [B, T, C*H*W]
    vectors = F.normalize(vectors, dim=-1)
    return vectors @ vectors.transpose(1, 2)


def tmd_loss(pred: torch.Tensor, tgt: torch.Tensor, reference_layout: bool = False) -> torch.Tensor:
    """KL(softmax(S_tgt) ‖ softmax(S_pred)) averaged over B·T·T; pred, tgt [B, C, T, H, W] -> scalar."""
    sim_pred = frame_similarity(pred, reference_layout)
    sim_tgt = frame_similarity(tgt, reference_layout)
    log_prob_pred = F.log_softmax(sim_pred, dim=-1)
    prob_tgt = F.softmax(sim_tgt, dim=-1)
    # Elementwise what F.kl_div(log_prob_pred, prob_tgt, reduction="mean") computes, without its
    # deprecation warning for "mean": the average over all B·T·T entries, as the reference does.
    return (torch.xlogy(prob_tgt, prob_tgt) - prob_tgt * log_prob_pred).mean()


def distill_loss(
    pred: torch.Tensor,
    tgt: torch.Tensor,
    lam: float = 100.0,
    use_tmd: bool = True,
    reference_layout: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student output `pred` vs teacher output `tgt`, both [B, C, T, H, W].

    Returns (total, {"mse": ..., "tmd": ...}); total = mse + lam·tmd, or mse alone when
    `use_tmd` is False (the W4A6 recipe), in which case "tmd" is a zero tensor.
    """
    mse = F.mse_loss(pred, tgt)
    if not use_tmd:
        return mse, {"mse": mse, "tmd": torch.zeros_like(mse)}
    relation = tmd_loss(pred, tgt, reference_layout)
    return mse + lam * relation, {"mse": mse, "tmd": relation}
