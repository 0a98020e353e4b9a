"""GPTQ v1 bit packing: b-bit codes into int32 words along the first dimension.

Every 32 consecutive codes form one little-endian bit stream of 32 * b bits, stored as b int32
words; code v occupies bits [v*b, (v+1)*b) of the stream. For b = 2, 4, 8 no code crosses a word;
for b = 3 two codes per 32 do (the 10-1-10-1-10 layout of GPTQ's 3-bit format). The stream of n
codes takes ceil(n * b / 32) words, the shape GPTQ tools expect; bits past the last code are zero.
"""
from __future__ import annotations

import math

import torch

WORD_BITS = 32
_MASK = (1 << WORD_BITS) - 1


def packed_length(n: int, bits: int) -> int:
    """Rows of int32 words that hold n codes of the given width."""
    return math.ceil(n * bits / WORD_BITS)


def _layout(bits: int, device):
    start = torch.arange(WORD_BITS, device=device) * bits
    return start // WORD_BITS, start % WORD_BITS  # word of each code, bit offset in that word


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [packed_length(n, bits), m] from integer codes [n, m] in [0, 2^bits)."""
    n, m = codes.shape
    n_pad = math.ceil(n / WORD_BITS) * WORD_BITS
    c = torch.zeros(n_pad, m, dtype=torch.int64, device=codes.device)
    c[:n] = codes.to(torch.int64)
    c = c.view(-1, WORD_BITS, m)
    word, shift = _layout(bits, codes.device)
    shift = shift.view(1, -1, 1)
    words = torch.zeros(c.shape[0], bits, m, dtype=torch.int64, device=codes.device)
    # Bits of different codes never overlap, so adding is OR-ing. The high part is zero unless
    # the code crosses into the next word.
    words.index_add_(1, word, (c << shift) & _MASK)
    words.index_add_(1, (word + 1).clamp(max=bits - 1), c >> (WORD_BITS - shift))
    words = words.view(-1, m)[: packed_length(n, bits)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first n integer codes [n, m] (int64) of packed int32 words [packed_length(n), m]."""
    m = packed.shape[1]
    w = torch.zeros(math.ceil(n / WORD_BITS) * bits, m, dtype=torch.int64, device=packed.device)
    w[: packed.shape[0]] = packed.to(torch.int64) & _MASK
    w = w.view(-1, bits, m)
    word, shift = _layout(bits, packed.device)
    shift = shift.view(1, -1, 1)
    low = w[:, word] >> shift
    # Shifting the next word left by at least `bits` leaves the low bits zero when nothing spills.
    high = w[:, (word + 1).clamp(max=bits - 1)] << (WORD_BITS - shift)
    return ((low | high) & (2**bits - 1)).reshape(-1, m)[:n]
