"""Integer codes of quantized tensors and their storage containers.

Code convention (one rule for weights and activations, every bit width b):
    affine grid      q ∈ [0, 2^b − 1], zero point z     ->  code c = q − 2^(b−1),  zero code z_c = z − 2^(b−1)
    symmetric grid   q ∈ [−2^(b−1), 2^(b−1) − 1], z = 0 ->  code c = q,           zero code z_c = 0
so every code is a signed integer in [−2^(b−1), 2^(b−1) − 1] and the dequantized value is unchanged:
    x̂ = (q − z)·Δ = (c − z_c)·Δ.
Containers: b ≤ 4 -> "int4x2" (two signed nibbles per byte, below); 5 ≤ b ≤ 8 -> "int8" (one code per byte).
3-bit (and 2-bit) codes sit in the 4-bit container on their own grid: the nibble holds c ∈ [−4, 3].

int4x2 layout ("half split"): for codes c [N, K], with K2 = ⌈K/2⌉,
    byte [n, j] = (c[n, j] & 0xF) | (c[n, j + K2] << 4)        (the high nibble is 0 where j + K2 ≥ K)
so byte column j carries input channels j and j + K2. A GEMM kernel reads one packed K-tile and gets two
contiguous K-tiles of codes, each meeting a contiguous tile of activations: no interleave shuffle.
"""
from __future__ import annotations

import torch

CONTAINERS = ("int8", "int4x2")


def code_offset(bits: int, symmetric: bool) -> int:
    """What is subtracted from a quantizer's integer q to get the signed code: 2^(b−1) (affine) or 0."""
    _check_bits(bits)
    return 0 if symmetric else 2 ** (bits - 1)


def code_range(bits: int) -> tuple[int, int]:
    """[c_min, c_max] = [−2^(b−1), 2^(b−1) − 1], the signed code range of `bits`."""
    _check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def container_for(bits: int) -> str:
    """'int4x2' for b ≤ 4, 'int8' for 5 ≤ b ≤ 8."""
    _check_bits(bits)
    return "int4x2" if bits <= 4 else "int8"


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an int in 2..8, got {bits!r}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [N, K] (any integer dtype, values in [−8, 7]) -> packed bytes uint8 [N, ⌈K/2⌉].

    Layout: see the module docstring (channel j in the low nibble, channel j + ⌈K/2⌉ in the high one).
    Raises ValueError for codes outside [−8, 7].
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_int4: expected codes [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_int4: expected an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{int(codes.min())}, {int(codes.max())}]")
    rows, cols = codes.shape
    half = (cols + 1) // 2
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)  # two's-complement nibble of each code
    low = nibbles[:, :half]
    high = torch.zeros(rows, half, dtype=torch.uint8, device=codes.device)
    high[:, : cols - half] = nibbles[:, half:]
    return (low | (high << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Packed bytes [N, ⌈K/2⌉] (uint8 or int8) -> signed codes int8 [N, K], K = `cols`."""
    if packed.dim() != 2 or packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"unpack_int4: expected packed bytes [N, ceil(K/2)] uint8/int8, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    half = (cols + 1) // 2
    if packed.shape[1] != half:
        raise ValueError(f"unpack_int4: {cols} columns need {half} packed bytes per row, got {packed.shape[1]}")
    as_int = packed.view(torch.uint8).to(torch.int16)
    low = ((as_int & 0xF) ^ 0x8) - 0x8  # sign-extend the nibble
    high = ((as_int >> 4) ^ 0x8) - 0x8
    return torch.cat([low, high], dim=1)[:, :cols].to(torch.int8).contiguous()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [N, K] of `bits` -> their container: int8 [N, K] or uint8 [N, ⌈K/2⌉] (int4x2)."""
    c_min, c_max = code_range(bits)
    if codes.numel() and (int(codes.min()) < c_min or int(codes.max()) > c_max):
        raise ValueError(f"pack_codes: {bits}-bit codes must lie in [{c_min}, {c_max}], "
                         f"got [{int(codes.min())}, {int(codes.max())}]")
    if container_for(bits) == "int4x2":
        return pack_int4(codes)
    return codes.to(torch.int8).contiguous()


def unpack_codes(stored: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the container tensor -> signed codes int8 [N, K]."""
    if container_for(bits) == "int4x2":
        return unpack_int4(stored, cols)
    if stored.dtype != torch.int8 or stored.dim() != 2 or stored.shape[1] != cols:
        raise ValueError(f"unpack_codes: expected int8 [N, {cols}], got {stored.dtype} {tuple(stored.shape)}")
    return stored
