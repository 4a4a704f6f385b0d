"""Orthonormal Hadamard matrices for online rotation of a linear layer's input channels
(QuaRot; the "dynamic" half of ViDiT-Q's channel balancing, METHOD.md §6).

A rotation is exact in floating point: with H orthonormal (H·Hᵀ = I),
    y = x · Wᵀ = (x · H) · (W · H)ᵀ
and it spreads channel outliers over all channels, which helps per-token quantization.

Construction of order n = 2^k · m, m a base order:
- m = 1: Sylvester doubling  H_2n = [[H, H], [H, −H]].
- m = q + 1, q prime, q ≡ 3 (mod 4): Paley construction I from the Jacobsthal matrix of q
  (12 = 11+1, 20 = 19+1, 44 = 43+1, 60 = 59+1).
- m = 2(q + 1), q prime, q ≡ 1 (mod 4): Paley construction II (28 = 2·14 from q = 13,
  36 = 2·18 from q = 17).
then H_n = H_m ⊗ H_{2^k}, scaled by 1/√n. Typical transformer widths decompose as
1152 = 36·32, 4608 = 36·128, 72 = 36·2, 384 = 12·32, 48 = 12·4 and 32, 64, 256, 4096 = 2^k.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard", "random_hadamard", "supported_base_orders", "hadamard_factorization"]

# base order m -> (Paley construction, prime q); m = 1 is pure Sylvester.
_PALEY_BASES: tuple[tuple[int, int, int], ...] = (
    (12, 1, 11),
    (20, 1, 19),
    (28, 2, 13),
    (36, 2, 17),
    (44, 1, 43),
    (60, 1, 59),
)


def supported_base_orders() -> tuple[int, ...]:
    """The base orders m for which n = 2^k · m is supported."""
    return (1,) + tuple(m for m, _, _ in _PALEY_BASES)


def hadamard_factorization(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m · 2^k and m the smallest supported base order; ValueError if none."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"hadamard order must be a positive int, got {n!r}")
    for m in supported_base_orders():
        if n % m == 0:
            power = n // m
            if power & (power - 1) == 0:  # power of two (1 included)
                return m, power
    forms = ", ".join(f"{m}·2^k" if m != 1 else "2^k" for m in supported_base_orders())
    raise ValueError(f"no Hadamard matrix of order {n}: supported orders are {forms}")


def _quadratic_character(q: int) -> list[int]:
    """χ(a) for a in 0..q−1: 0 for a = 0, +1 for nonzero squares mod q, −1 otherwise."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i mod q): [q, q] int64."""
    chi = torch.tensor(_quadratic_character(q), dtype=torch.int64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley(construction: int, q: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix (int64) of order q+1 (I) or 2(q+1) (II)."""
    jacobsthal = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.int64)
    core = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    core[1:, 1:] = jacobsthal
    core[0, 1:] = ones
    if construction == 1:
        # Q is antisymmetric for q ≡ 3 (mod 4): S = [[0, 1ᵀ], [−1, Q]], H = I + S.
        core[1:, 0] = -ones
        return torch.eye(q + 1, dtype=torch.int64) + core
    # Q is symmetric for q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] is a symmetric conference
    # matrix; replace 0 by [[1, −1], [−1, −1]] and ±1 by ±[[1, 1], [1, −1]].
    core[1:, 0] = ones
    zero_block = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    sign_block = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    return torch.kron(core, sign_block) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero_block)


def _sylvester(order: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.int64)
    while matrix.shape[0] < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


@functools.lru_cache(maxsize=16)
def _sign_matrix(n: int) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order n (int8, CPU)."""
    base, power = hadamard_factorization(n)
    matrix = _sylvester(power).to(torch.int8)
    for m, construction, q in _PALEY_BASES:
        if m == base:
            matrix = torch.kron(_paley(construction, q).to(torch.int8), matrix)
    return matrix


@functools.lru_cache(maxsize=32)
def _normalised(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # ±1 is exact in every float dtype, so one multiply by 1/√n (rounded once to `dtype`)
    # gives the correctly rounded ±1/√n.
    return _sign_matrix(n).to(device=device, dtype=dtype) * (1.0 / math.sqrt(n))


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Hadamard matrix H: [n, n] with H·Hᵀ = I, entries ±1/√n.

    n must be 2^k · m with m in `supported_base_orders()` (1, 12, 20, 28, 36, 44, 60);
    other n raise ValueError listing the supported forms. The matrix is cached per
    (n, dtype, device); a fresh copy is returned, so in-place edits are safe.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    return _normalised(n, dtype, device).clone()


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """QuaRot-style randomised Hadamard H · diag(d), d ∈ {±1}^n drawn from `seed`: [n, n],
    orthonormal. The same seed gives the same matrix on every device."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1  # [n] ±1
    device = torch.device("cpu") if device is None else torch.device(device)
    return _normalised(n, dtype, device) * signs.to(device=device, dtype=dtype)[None, :]
