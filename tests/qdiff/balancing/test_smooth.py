"""qdiff/balancing/smooth.py: smoothing scales, FP output preservation, running statistics."""
import pytest
import torch

from qdiff.balancing import ChannelStats, hadamard, smooth_scales


def _layer(d_in=48, d_out=64, tokens=10):
    x = torch.randn(2, tokens, d_in, dtype=torch.float64)
    x[..., 3] *= 50.0  # an outlier channel
    weight = torch.randn(d_out, d_in, dtype=torch.float64) * 0.05
    return x, weight


def test_scales_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    weight = torch.tensor([[1.0, -2.0, 0.5], [-4.0, 0.5, 0.25]])
    s = smooth_scales(act, weight, alpha=0.5)
    expected = torch.tensor([4.0 ** 0.5 / 4.0 ** 0.5, 1.0 / 2.0 ** 0.5, 3.0 / 0.5 ** 0.5])
    torch.testing.assert_close(s, expected)


def test_scales_clamp_zero_channels():
    act = torch.tensor([0.0, 2.0])
    weight = torch.tensor([[0.0, 1.0]])
    s = smooth_scales(act, weight, alpha=0.5, eps=1e-5)
    assert torch.isfinite(s).all() and (s > 0).all()
    torch.testing.assert_close(s[0], torch.tensor(1.0))  # (1e-5)^0.5 / (1e-5)^0.5


def test_scales_validate_shapes_and_alpha():
    with pytest.raises(ValueError, match="act_absmax"):
        smooth_scales(torch.ones(3), torch.ones(2, 4), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(4), torch.ones(2, 4), 1.5)


def test_smoothing_preserves_output_in_fp():
    x, weight = _layer()
    stats = ChannelStats()
    stats.update(x)
    s = stats.scales(weight, alpha=0.5).double()
    torch.testing.assert_close((x / s) @ (weight * s).T, x @ weight.T)
    # and it actually flattens the outlier channel
    assert (x / s).abs().amax(dim=(0, 1))[3] < x.abs().amax(dim=(0, 1))[3]


def test_rotation_preserves_output_in_fp():
    x, weight = _layer()
    rotation = hadamard(48, dtype=torch.float64)
    torch.testing.assert_close((x @ rotation) @ (weight @ rotation).T, x @ weight.T)


def test_smooth_then_rotate_preserves_output_in_fp():
    x, weight = _layer()
    s = smooth_scales(x.abs().amax(dim=(0, 1)), weight, alpha=0.11).double()
    rotation = hadamard(48, dtype=torch.float64)
    x_balanced = (x / s) @ rotation  # static scaling, then online rotation
    weight_balanced = (weight * s) @ rotation
    torch.testing.assert_close(x_balanced @ weight_balanced.T, x @ weight.T)


def test_channel_stats_momentum_by_hand():
    stats = ChannelStats(momentum=0.95)
    # batch 1: [B=2, N=2, C=2]; per-sample token max |x|: [[3, 4], [1, 2]] -> mean [2, 3]
    first = torch.tensor([[[1.0, -4.0], [-3.0, 2.0]], [[1.0, 2.0], [0.5, -1.0]]])
    torch.testing.assert_close(stats.update(first), torch.tensor([2.0, 3.0]))
    # batch 2: per-sample max [[10, 0], [6, 2]] -> mean [8, 1]; 0.95*[2,3] + 0.05*[8,1]
    second = torch.tensor([[[10.0, 0.0], [0.0, 0.0]], [[-6.0, 2.0], [1.0, 1.0]]])
    torch.testing.assert_close(stats.update(second), torch.tensor([2.3, 2.9]))
    assert stats.num_updates == 2


def test_channel_stats_reductions_and_ranks():
    x = torch.tensor([[[1.0, -4.0], [-3.0, 2.0]], [[1.0, 2.0], [0.5, -1.0]]])
    torch.testing.assert_close(ChannelStats(reduction="max").batch_statistic(x), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(ChannelStats().batch_statistic(x[0]), torch.tensor([3.0, 4.0]))  # 2-D: one sample
    torch.testing.assert_close(ChannelStats().batch_statistic(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 2.0]))
    four_d = x.reshape(1, 2, 2, 2).expand(3, 2, 2, 2)  # [..., N, C]: mean over all leading axes
    torch.testing.assert_close(ChannelStats().batch_statistic(four_d), torch.tensor([2.0, 3.0]))


def test_channel_stats_errors():
    with pytest.raises(RuntimeError):
        ChannelStats().scales(torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        ChannelStats(momentum=1.0)
    stats = ChannelStats()
    stats.update(torch.ones(3, 4))
    with pytest.raises(ValueError, match="channel"):
        stats.update(torch.ones(3, 5))
