"""Per-frame video VAE on the tiny offline preset."""
import pytest
import torch

from t2v.models.vae import VideoAutoencoderKL, build_tiny_vae


@pytest.fixture(scope="module")
def video():
    return torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_tiny_shapes(video):
    vae = build_tiny_vae(seed=0)
    assert vae.downsample_factor == 2 and vae.out_channels == 4
    z = vae.encode(video)
    assert z.shape == (2, 4, 3, 8, 8)
    assert vae.decode(z).shape == (2, 3, 3, 16, 16)


def test_micro_batching_matches_one_batch(video):
    whole = build_tiny_vae(seed=0, micro_batch_size=None)
    micro = build_tiny_vae(seed=0, micro_batch_size=4)  # 6 frames -> chunks of 4 and 2
    z = whole.encode(video, sample_posterior=False)
    torch.testing.assert_close(micro.encode(video, sample_posterior=False), z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(micro.decode(z), whole.decode(z), rtol=1e-5, atol=1e-6)


def test_frames_are_independent_and_scaled(video):
    vae = build_tiny_vae(seed=0)
    z = vae.encode(video, sample_posterior=False)
    frame = video[1, :, 2][None]  # [1, 3, H, W]
    posterior_mean = vae.module.encode(frame).latent_dist.mean
    torch.testing.assert_close(z[1, :, 2], posterior_mean[0] * 0.18215, rtol=1e-5, atol=1e-6)


def test_posterior_sampling_uses_generator(video):
    vae = build_tiny_vae(seed=0)
    a = vae.encode(video, generator=torch.Generator().manual_seed(1))
    b = vae.encode(video, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, vae.encode(video, sample_posterior=False))


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        VideoAutoencoderKL(from_pretrained=str(tmp_path / "vae"))
    message = str(err.value)
    assert str(tmp_path / "vae") in message and "stabilityai/sd-vae-ft-ema" in message
    assert "huggingface-cli download" in message
