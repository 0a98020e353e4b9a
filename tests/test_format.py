import pytest
import torch

from qrecover.format import pack_codes, packed_length, unpack_codes


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reference: each 32 codes of a column as one Python-integer bit stream."""
    n, m = codes.shape
    words = torch.zeros(packed_length(n, bits), m, dtype=torch.int64)
    for col in range(m):
        for block in range(0, n, 32):
            stream = 0
            for v, code in enumerate(codes[block : block + 32, col].tolist()):
                stream |= code << (v * bits)
            for w in range(bits):
                word = (stream >> (32 * w)) & 0xFFFFFFFF
                words[block // 32 * bits + w, col] = word - (1 << 32) if word >= 1 << 31 else word
    return words.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 33, 80, 576])
def test_round_trip_random_codes(bits, n):
    codes = torch.randint(0, 2**bits, (n, 7))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_length(n, bits), 7)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_is_gptq_v1(bits):
    codes = torch.randint(0, 2**bits, (64, 3))
    codes[0] = 2**bits - 1  # the sign bit of the first word is set for 8-bit and others
    codes[31] = 2**bits - 1
    assert torch.equal(pack_codes(codes, bits), reference_pack(codes, bits))


def test_three_bit_codes_cross_words():
    # Codes 10 and 21 straddle words in the 10-1-10-1-10 layout of 3-bit GPTQ.
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b101
    codes[21] = 0b011
    words = pack_codes(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert (words[0, 0] >> 30) == 0b01 and (words[1, 0] & 1) == 0b1
    assert (words[1, 0] >> 31) == 0b1 and (words[2, 0] & 0b11) == 0b01


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_are_stored_as_the_format_says(bits, fmt):
    """qzeros hold zero - 1 in GPTQ v1 and the zero itself in v2, packed along the output dimension."""
    from qrecover.format import ZERO_OFFSETS, pack_zeros, unpack_zeros

    offset = {"gptq": 1, "gptq_v2": 0}[fmt]
    assert ZERO_OFFSETS[fmt] == offset
    zeros = torch.randint(1, 2**bits, (3, 96))
    qzeros = pack_zeros(zeros, bits, offset)
    assert qzeros.shape == (3, packed_length(96, bits))
    assert torch.equal(reference_pack((zeros - offset).t(), bits).t().to(torch.int32), qzeros)
    assert torch.equal(unpack_zeros(qzeros, bits, 96, offset), zeros)
