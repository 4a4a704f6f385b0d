"""t2v.eval.metrics: PSNR, SSIM, temporal-consistency and optical-flow deviation against hand-computed values."""
import math
import sys

import numpy as np
import pytest
import torch

from t2v.eval import metrics
from t2v.eval.metrics import (flow_errors, have_cv2, pool_metrics, psnr, ssim, ssim_per_frame, temporal_error,
                              video_metrics)

needs_cv2 = pytest.mark.skipif(not have_cv2(), reason="OpenCV (cv2) not installed")


def pattern(t=2, h=24, w=20):
    """A deterministic uint8 video [t, h, w, 3] with structure in every axis."""
    f, i, j, c = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), torch.arange(3), indexing="ij")
    return ((i * 7 + j * 13 + c * 29 + f * 5) % 256).to(torch.uint8)


def moving_texture(frames=4, size=48, speed=1):
    """uint8 [frames, size, size, 3]: a smooth texture moving right by `speed` pixels per frame."""
    y = torch.arange(size, dtype=torch.float64).view(size, 1)
    x = torch.arange(size, dtype=torch.float64).view(1, size)
    video = []
    for t in range(frames):
        xs = x - speed * t
        img = 128 + 60 * torch.sin(2 * math.pi * xs / 16) * torch.cos(2 * math.pi * y / 12) \
            + 30 * torch.sin(2 * math.pi * (xs + y) / 20)
        video.append(img.clamp(0, 255).round().to(torch.uint8)[..., None].expand(size, size, 3))
    return torch.stack(video)


def brute_force_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one frame [H, W, 3] by explicit 11x11 Gaussian windows at every valid position."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        for r in range(x.shape[0] - 10):
            for s in range(x.shape[1] - 10):
                px, py = x[r:r + 11, s:s + 11], y[r:r + 11, s:s + 11]
                mx, my = (window * px).sum(), (window * py).sum()
                vx, vy = (window * px * px).sum() - mx ** 2, (window * py * py).sum() - my ** 2
                cov = (window * px * py).sum() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_identical_videos_are_perfect():
    video = pattern()
    assert psnr(video, video) == math.inf
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-12)
    assert temporal_error(video, video) == 0.0


def test_psnr_of_a_constant_offset():
    video = pattern()
    shifted = (video.int().clamp(max=250) + 5).to(torch.uint8)
    mse = float(((shifted.double() - video.double()) ** 2).mean())
    assert psnr(shifted, video) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-12)
    flat = torch.full((2, 12, 12, 3), 100, dtype=torch.uint8)
    assert psnr(flat + 5, flat) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-12)


def test_ssim_of_constant_frames_is_the_luminance_term():
    a, b = 100.0, 110.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # no variance: contrast-structure term (C2/C2) = 1
    video = torch.full((3, 16, 16, 3), int(a), dtype=torch.uint8)
    other = torch.full((3, 16, 16, 3), int(b), dtype=torch.uint8)
    assert ssim(video, other) == pytest.approx(expected, abs=1e-12)
    assert ssim_per_frame(video, other).shape == (3,)


def test_ssim_matches_explicit_windows_and_scikit_image():
    video, other = pattern(), pattern().flip(1)
    per_frame = ssim_per_frame(video, other)
    for t in range(2):
        assert float(per_frame[t]) == pytest.approx(brute_force_ssim(video[t].numpy(), other[t].numpy()), abs=1e-12)
    # skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=255, channel_axis=-1), computed once with scikit-image 0.26 on these two videos:
    f, i, j, c = torch.meshgrid(torch.arange(2), torch.arange(24), torch.arange(20), torch.arange(3), indexing="ij")
    far = ((i * i + 3 * j + 11 * c + 17 * f) % 256).to(torch.uint8)
    near = (pattern().int() + (i * 3 + j * 5 + c) % 21 - 10).clamp(0, 255).to(torch.uint8)
    assert ssim_per_frame(pattern(), far).tolist() == pytest.approx([0.11032677423681486, 0.12470508494952831], abs=1e-12)
    assert ssim_per_frame(pattern(), near).tolist() == pytest.approx([0.9845798987167744, 0.9848800097987113], abs=1e-12)


def test_ssim_properties():
    video = pattern(3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(video.shape, generator=gen)
    scores = [ssim((video.double() + s * noise).clamp(0, 255).round().to(torch.uint8), video) for s in (2, 8, 32)]
    assert 1 > scores[0] > scores[1] > scores[2] > -1  # more noise, less similar
    other = pattern(3, 32, 32).flip(2)
    assert ssim(video, other) == pytest.approx(ssim(other, video), abs=1e-12)  # symmetric
    tiny = pattern(2, 7, 9)  # frames below the 11-pixel window use a 7-pixel one
    assert ssim(tiny, tiny) == pytest.approx(1.0, abs=1e-12)


def test_float_videos_are_scored_as_saved():
    gen = torch.Generator().manual_seed(1)
    decoded = torch.rand(3, 2, 16, 16, generator=gen) * 2 - 1  # the decoder's [3, T, H, W] in [-1, 1]
    other = (decoded + 0.05 * torch.randn(decoded.shape, generator=gen)).clamp(-1, 1)
    as_saved = metrics.as_uint8(decoded)
    assert as_saved.shape == (2, 16, 16, 3) and as_saved.dtype == torch.uint8
    assert psnr(other, decoded) == psnr(metrics.as_uint8(other), as_saved)
    assert ssim(other, decoded) == ssim(metrics.as_uint8(other), as_saved)


def test_temporal_error_hand_cases():
    ramp = torch.arange(4).view(4, 1, 1, 1).expand(4, 8, 8, 3) * 10  # frame t is 10 t everywhere
    reference = ramp.to(torch.uint8)
    assert temporal_error((ramp + 7).to(torch.uint8), reference) == 0.0  # same changes, other brightness
    assert temporal_error(reference[:1].expand(4, -1, -1, -1), reference) == 1.0  # static: |0 - 10| / 10
    assert temporal_error((ramp * 2).to(torch.uint8), reference) == 1.0  # twice the motion: |20 - 10| / 10
    assert temporal_error((ramp // 2).to(torch.uint8), reference) == pytest.approx(0.5)
    static = torch.full((3, 8, 8, 3), 9, dtype=torch.uint8)
    assert temporal_error(static, static) == 0.0  # 0/0 is no error
    assert temporal_error(reference[:3], static) == math.inf
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_error(reference[:1], reference[:1])


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(pattern(2, 24, 20), pattern(2, 20, 24))
    with pytest.raises(ValueError, match="shapes differ"):
        temporal_error(pattern(3), pattern(2))


@needs_cv2
def test_flow_of_a_moving_texture():
    moving = moving_texture(speed=1)
    static = moving[:1].expand(4, -1, -1, -1).contiguous()
    same = flow_errors(moving, moving)
    assert same == {"flow_epe": 0.0, "delta_flow": 0.0}
    off = flow_errors(static, moving)  # the reference moves 1 px per frame, the video not at all
    assert off["flow_epe"] == pytest.approx(1.0, abs=0.1)
    assert off["delta_flow"] == pytest.approx(1.0, abs=0.1)
    faster = flow_errors(moving_texture(speed=2), moving)
    assert faster["delta_flow"] == pytest.approx(1.0, abs=0.15)


def test_flow_is_skipped_without_opencv(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    assert not have_cv2()
    assert flow_errors(pattern(), pattern()) is None
    result = video_metrics(pattern(), pattern())
    assert result["flow_epe"] is None and result["delta_flow"] is None
    assert pool_metrics([result])["flow_epe"] is None
    with pytest.raises(ImportError, match="pip install opencv"):
        metrics.optical_flow(pattern())


def test_pooling_over_videos():
    reference = pattern(3, 16, 16)
    one = video_metrics(reference, reference)
    two = video_metrics((reference.int().clamp(max=245) + 10).to(torch.uint8), reference)
    pooled = pool_metrics([one, two])
    assert pooled["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / ((one["mse"] + two["mse"]) / 2)))
    assert math.isfinite(pooled["psnr"])  # one identical video does not make the run infinite
    assert pooled["ssim"] == pytest.approx((one["ssim"] + two["ssim"]) / 2)
    expected = (one["temporal_diff"] + two["temporal_diff"]) / (one["temporal_ref"] + two["temporal_ref"])
    assert pooled["temporal_error"] == pytest.approx(expected)
    with pytest.raises(ValueError):
        pool_metrics([])
