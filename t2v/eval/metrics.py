"""Fidelity of a generated video to a reference video (the FP model's, same prompt and seed).

Videos are uint8 [T, H, W, 3] (what is saved), or the decoder's float [3, T, H, W] in [-1, 1], which is
first converted to 8 bits exactly as it is saved (`t2v.pipeline.video_io.to_uint8`). Every metric works
in 8-bit units, so a number does not depend on which of the two forms was passed.

- `psnr`: dB, peak 255, over all pixels of the video (`t2v.pipeline.compare`); inf when identical.
- `ssim`: SSIM (Wang et al. 2004) with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  L = 255, over the window positions that lie inside the frame; per frame and RGB channel, averaged.
  This is scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)`. Frames smaller than 11 pixels use
  the largest odd window that fits.
- `temporal_error`: how differently the video changes from frame to frame than the reference,
  mean |Δ_t v − Δ_t ref| / mean |Δ_t ref| with Δ_t v = v[t+1] − v[t]; 0 when the frame-to-frame changes
  are the reference's, 1 when they are as far off as a static video would be.
- `flow_errors`: dense optical flow (OpenCV Farneback, grey frames) of every consecutive frame pair of
  both videos: the mean end-point error between the two flows (pixels) and the papers' ΔFlow, the
  absolute difference of the mean flow magnitudes (pixels per frame). None when `cv2` is not installed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from t2v.pipeline import compare
from t2v.pipeline.compare import psnr_from_mse, video_mse

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PEAK = 255.0
# Farneback settings (OpenCV's documented example): pyramid scale, levels, window, iterations, poly_n, poly_sigma.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def as_uint8(video: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] as is, or float [3, T, H, W] in [-1, 1] converted as it is saved -> uint8 [T, H, W, 3]
    on the CPU."""
    from t2v.pipeline.video_io import to_uint8

    return to_uint8(video)


def _pair(video: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both videos as float64 [T, H, W, 3] in 0..255; shapes must agree."""
    video, reference = as_uint8(video), as_uint8(reference)
    if video.shape != reference.shape:
        raise ValueError(f"video shapes differ: {tuple(video.shape)} vs reference {tuple(reference.shape)}")
    return video.double(), reference.double()


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB (peak 255) over the whole video; inf when identical (`t2v.pipeline.compare.psnr`)."""
    return compare.psnr(as_uint8(video), as_uint8(reference))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (float64), centred; size odd."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return weights / weights.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter: x [N, 1, H, W] -> [N, 1, H-k+1, W-k+1]."""
    k = window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, k))
    return F.conv2d(x, window.view(1, 1, k, 1))


def ssim_per_frame(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame (mean over the SSIM map and the RGB channels) -> float64 [T]."""
    video, reference = _pair(video, reference)
    num_frames, height, width, _ = video.shape
    size = min(SSIM_WINDOW, height, width)
    size -= 1 - size % 2  # largest odd window that fits
    window = gaussian_window(size)
    # [T, H, W, 3] -> [T*3, 1, H, W]: every (frame, channel) plane filtered on its own
    x = video.permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    y = reference.permute(0, 3, 1, 2).reshape(-1, 1, height, width)
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x ** 2
    var_y = _blur(y * y, window) - mu_y ** 2
    cov = _blur(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).view(num_frames, 3).mean(dim=1)


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over frames, in [-1, 1]; 1 when identical."""
    return float(ssim_per_frame(video, reference).mean())


def temporal_error_terms(video: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(mean |Δ_t v − Δ_t ref|, mean |Δ_t ref|) over all frame pairs and pixels, in 8-bit units."""
    video, reference = _pair(video, reference)
    if video.shape[0] < 2:
        raise ValueError(f"temporal metrics need at least 2 frames, got {video.shape[0]}")
    diff_v, diff_ref = video.diff(dim=0), reference.diff(dim=0)  # [T-1, H, W, 3]
    return float((diff_v - diff_ref).abs().mean()), float(diff_ref.abs().mean())


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0/0 = 0 and x/0 = inf."""
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def temporal_error(video: torch.Tensor, reference: torch.Tensor) -> float:
    """mean |Δ_t v − Δ_t ref| / mean |Δ_t ref| (0 = the reference's frame-to-frame changes)."""
    return ratio(*temporal_error_terms(video, reference))


def have_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def optical_flow(video: torch.Tensor):
    """Farneback flow of every consecutive frame pair -> float32 numpy [T-1, H, W, 2] (x, y), pixels.

    Raises ImportError (saying how to install it) when OpenCV is missing.
    """
    try:
        import cv2
    except ImportError:
        raise ImportError("optical-flow metrics need OpenCV: pip install opencv-python-headless") from None
    import numpy as np

    frames = as_uint8(video).numpy()
    if frames.shape[0] < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {frames.shape[0]}")
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    flows = [cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK) for a, b in zip(grey[:-1], grey[1:])]
    return np.stack(flows)


def flow_errors(video: torch.Tensor, reference: torch.Tensor) -> dict | None:
    """Flow deviation in pixels: {"flow_epe": mean ‖flow_v − flow_ref‖₂,
    "delta_flow": |mean ‖flow_v‖ − mean ‖flow_ref‖|}; None when OpenCV is not installed."""
    if not have_cv2():
        return None
    video, reference = as_uint8(video), as_uint8(reference)
    if video.shape != reference.shape:
        raise ValueError(f"video shapes differ: {tuple(video.shape)} vs reference {tuple(reference.shape)}")
    flow_v = torch.from_numpy(optical_flow(video)).double()
    flow_ref = torch.from_numpy(optical_flow(reference)).double()
    return {
        "flow_epe": float((flow_v - flow_ref).norm(dim=-1).mean()),
        "delta_flow": abs(float(flow_v.norm(dim=-1).mean() - flow_ref.norm(dim=-1).mean())),
    }


def video_metrics(video: torch.Tensor, reference: torch.Tensor) -> dict:
    """Every metric of one video against its reference: mse, psnr, ssim, temporal_error (with its two terms),
    flow_epe and delta_flow (None without OpenCV)."""
    video, reference = as_uint8(video), as_uint8(reference)
    mse = video_mse(video, reference)
    moved, ref_moved = temporal_error_terms(video, reference)
    flow = flow_errors(video, reference) or {"flow_epe": None, "delta_flow": None}
    return {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(video, reference),
            "temporal_error": ratio(moved, ref_moved), "temporal_diff": moved, "temporal_ref": ref_moved, **flow}


def pool_metrics(per_video: list[dict]) -> dict:
    """One number per metric over several videos (equal sizes): PSNR from the mean MSE (so one identical
    video does not make it inf), temporal error from the summed terms, SSIM and flow errors averaged."""
    if not per_video:
        raise ValueError("pool_metrics: no videos")
    n = len(per_video)
    pooled = {
        "psnr": psnr_from_mse(sum(m["mse"] for m in per_video) / n),
        "ssim": sum(m["ssim"] for m in per_video) / n,
        "temporal_error": ratio(sum(m["temporal_diff"] for m in per_video), sum(m["temporal_ref"] for m in per_video)),
    }
    for key in ("flow_epe", "delta_flow"):
        values = [m[key] for m in per_video]
        pooled[key] = None if any(v is None for v in values) else sum(values) / n
    return pooled
