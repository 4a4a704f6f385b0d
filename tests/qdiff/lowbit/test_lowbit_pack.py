"""qdiff.lowbit.pack: code conventions and int4 packing (two signed codes per byte, half-split layout)."""
import pytest
import torch

from qdiff.lowbit.pack import (
    code_offset,
    code_range,
    container_for,
    pack_codes,
    pack_int4,
    unpack_codes,
    unpack_int4,
)


@pytest.mark.parametrize("cols", [1, 2, 7, 33, 64, 1151])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_round_trip(cols, bits):
    low, high = code_range(bits)
    codes = torch.randint(low, high + 1, (5, cols), dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 1) // 2)
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_int4_layout_is_half_split():
    codes = torch.tensor([[1, -2, 3, -8, 7]], dtype=torch.int8)  # K = 5, K2 = 3
    packed = pack_int4(codes)
    # byte j = code[j] (low nibble) | code[j + 3] (high nibble); the last high nibble is padding (0)
    assert packed.tolist() == [[0x1 | (0x8 << 4), 0xE | (0x7 << 4), 0x3]]
    assert torch.equal(unpack_int4(packed, 5), codes)
    assert torch.equal(unpack_int4(packed.view(torch.int8), 5), codes)  # the kernels' view


def test_every_nibble_value():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    assert torch.equal(unpack_int4(pack_int4(codes), 32), codes)


def test_int8_container_and_conventions():
    codes = torch.randint(-128, 128, (4, 9), dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(codes, 8), 8, 9), codes)
    assert [container_for(b) for b in (2, 3, 4, 5, 6, 8)] == ["int4x2"] * 3 + ["int8"] * 3
    assert code_offset(8, symmetric=False) == 128 and code_offset(3, symmetric=False) == 4
    assert code_offset(4, symmetric=True) == 0
    assert code_range(6) == (-32, 31)


def test_errors():
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([[8]]))
    with pytest.raises(ValueError, match=r"3-bit codes must lie in \[-4, 3\]"):
        pack_codes(torch.tensor([[-5]]), 3)
    with pytest.raises(ValueError, match="need 2 packed bytes"):
        unpack_int4(torch.zeros(1, 3, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_int4(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="bits"):
        container_for(9)
