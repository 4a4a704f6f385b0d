"""qdiff/balancing/hadamard.py: orthonormality for every STDiT width, errors, caching."""
import pytest
import torch

from qdiff.balancing import hadamard, hadamard_factorization, random_hadamard, supported_base_orders

STDIT_DIMS = [1152, 4608, 64, 256, 384, 4096, 72, 48, 32]


@pytest.mark.parametrize("n", STDIT_DIMS + list(supported_base_orders()) + [2, 24, 56])
def test_orthonormal(n):
    matrix = hadamard(n)
    assert matrix.shape == (n, n) and matrix.dtype == torch.float32
    # H·Hᵀ = I; for the two big widths check 96 random rows against all rows (keeps CPU time low)
    rows = torch.randperm(n)[:96] if n > 2048 else torch.arange(n)
    torch.testing.assert_close(matrix[rows] @ matrix.T, torch.eye(n)[rows], atol=1e-5, rtol=0)
    # every entry is ±1/√n
    torch.testing.assert_close(matrix.abs(), torch.full((n, n), n ** -0.5), atol=1e-7, rtol=0)


def test_factorisation_of_stdit_dims():
    assert hadamard_factorization(1152) == (36, 32)
    assert hadamard_factorization(4608) == (36, 128)
    assert hadamard_factorization(72) == (36, 2)
    assert hadamard_factorization(384) == (12, 32)
    assert hadamard_factorization(4096) == (1, 4096)


@pytest.mark.parametrize("n", [3, 100, 1000])
def test_unsupported_order(n):
    with pytest.raises(ValueError, match="supported orders are 2\\^k, 12·2\\^k"):
        hadamard(n)
    with pytest.raises(ValueError, match="positive int"):
        hadamard(0)


def test_dtype_device_and_copy():
    matrix = hadamard(12, dtype=torch.float64, device="cpu")
    assert matrix.dtype == torch.float64
    matrix.zero_()  # a fresh copy: the cache is untouched
    assert hadamard(12, dtype=torch.float64).abs().sum() > 0


def test_random_hadamard():
    first = random_hadamard(384, seed=3)
    torch.testing.assert_close(first @ first.T, torch.eye(384), atol=1e-5, rtol=0)
    torch.testing.assert_close(first, random_hadamard(384, seed=3))
    assert not torch.equal(first, random_hadamard(384, seed=4))
    # H·diag(d): columns of the plain matrix with flipped signs
    ratio = first / hadamard(384)
    assert torch.allclose(ratio, ratio[0:1].expand_as(ratio)) and set(ratio[0].round().tolist()) <= {-1.0, 1.0}
