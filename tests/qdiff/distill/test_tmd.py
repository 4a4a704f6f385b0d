"""Tests for qdiff/distill/tmd.py against the Q-VDiT reference fixtures."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qdiff.distill.tmd import distill_loss, frame_similarity, tmd_loss


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    return load_file(str(fixtures_dir / "qdiff" / "qdiff.safetensors"))


def test_reference_layout_matches_fixture(fx):
    total, parts = distill_loss(fx["tmd.pred"], fx["tmd.tgt"], lam=100.0, reference_layout=True)
    torch.testing.assert_close(parts["mse"], fx["tmd.mse"][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(parts["tmd"], fx["tmd.relation"][0], rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(total, fx["tmd.total"][0], rtol=1e-6, atol=1e-9)


def test_true_frames_matches_fixture_and_is_default(fx):
    relation = tmd_loss(fx["tmd.pred"], fx["tmd.tgt"])
    torch.testing.assert_close(relation, fx["tmd.relation_true_frames"][0], rtol=1e-5, atol=1e-10)
    assert not torch.isclose(relation, fx["tmd.relation"][0])


def test_kl_matches_torch_kl_div(fx):
    s_pred = frame_similarity(fx["tmd.pred"])
    s_tgt = frame_similarity(fx["tmd.tgt"])
    with pytest.warns(UserWarning):
        expected = F.kl_div(F.log_softmax(s_pred, -1), F.softmax(s_tgt, -1), reduction="mean")
    torch.testing.assert_close(tmd_loss(fx["tmd.pred"], fx["tmd.tgt"]), expected)


def test_frame_similarity_is_cosine_of_true_frames():
    x = torch.randn(2, 3, 4, 5, 5)
    sim = frame_similarity(x)
    assert sim.shape == (2, 4, 4)
    torch.testing.assert_close(torch.diagonal(sim, dim1=1, dim2=2), torch.ones(2, 4))
    expected = F.cosine_similarity(x[1, :, 0].flatten(), x[1, :, 2].flatten(), dim=0)
    torch.testing.assert_close(sim[1, 0, 2], expected)


def test_frame_similarity_rejects_wrong_rank():
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        frame_similarity(torch.randn(2, 3, 4, 5))


def test_plain_mse_without_tmd_and_gradients():
    pred = torch.randn(1, 2, 3, 4, 4, requires_grad=True)
    tgt = torch.randn(1, 2, 3, 4, 4)
    total, parts = distill_loss(pred, tgt, use_tmd=False)
    torch.testing.assert_close(total, F.mse_loss(pred, tgt))
    assert parts["tmd"].item() == 0.0
    total, _ = distill_loss(pred, tgt)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_identical_outputs_give_zero_loss():
    x = torch.randn(2, 2, 3, 4, 4)
    total, parts = distill_loss(x, x.clone())
    assert parts["mse"].item() == 0.0
    assert abs(parts["tmd"].item()) < 1e-7
