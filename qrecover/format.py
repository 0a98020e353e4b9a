"""The GPTQ tensor format, in one place: bit packing, stored zero points, the solver's result.

Packing: every 32 consecutive codes form one little-endian bit stream of 32 * b bits, stored as b int32
words; code v occupies bits [v*b, (v+1)*b) of the stream. For b = 2, 4, 8 no code crosses a word;
for b = 3 two codes per 32 do (the 10-1-10-1-10 layout of GPTQ's 3-bit format). The stream of n
codes takes ceil(n * b / 32) words, the shape GPTQ tools expect; bits past the last code are zero.
Zero points: qzeros packs them along the output dimension and stores zero - offset, where the
offset is 1 in GPTQ v1 (`checkpoint_format: gptq`, which every GPTQ reader takes) and 0 in v2
(`gptq_v2`, the raw zero). v1 cannot hold a zero point of 0, so GPTQModel refuses asymmetric v1
files it did not write itself; qrecover writes symmetric grids as v1 and asymmetric ones as v2.
Its grids never make a zero point below 1, so a layer converts between the two without loss.
nn, kernels, io and export read and write the format only through this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WORD_BITS = 32
_MASK = (1 << WORD_BITS) - 1
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> qzeros holds zero - offset
MIN_ZERO = 1  # the smallest zero point qrecover's grids make: what v1 can hold


def checkpoint_format(sym: bool) -> str:
    """The GPTQ format qrecover writes a grid in: v1 when symmetric, v2 when asymmetric."""
    return "gptq" if sym else "gptq_v2"


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


def pack_zeros(zeros: torch.Tensor, bits: int, offset: int) -> torch.Tensor:
    """qzeros [n_groups, packed_length(out)] from integer zero points [n_groups, out], stored as zero - offset."""
    return pack_codes((zeros.t() - offset).round().long(), bits).t()


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, offset: int) -> torch.Tensor:
    """Integer zero points [n_groups, out] (int64) from qzeros that store zero - offset."""
    return unpack_codes(qzeros.t(), bits, out_features).t() + offset


def dequantize_weight(qweight, qzeros, scales, g_idx, bits: int, in_features: int, zero_offset: int, dtype) -> torch.Tensor:
    """The dense part of a layer, transposed: [in, out] in dtype (scale * (code - zero) per group)."""
    codes = unpack_codes(qweight, bits, in_features)
    zeros = unpack_zeros(qzeros, bits, scales.shape[1], zero_offset)
    g = g_idx.long()
    return scales[g].to(dtype) * (codes - zeros[g]).to(dtype)


@dataclass
class QuantResult:
    """One quantized layer before packing, as the GPTQ solver returns it."""

    codes: torch.Tensor  # [out, in] integer codes (salient columns hold their group's zero)
    scales: torch.Tensor  # [n_groups, out]
    zeros: torch.Tensor  # [n_groups, out]
    g_idx: torch.Tensor  # [in] group of each input column
    salient_idx: torch.Tensor  # [k] sorted
    salient_weight: torch.Tensor  # [out, k]
    bits: int
    damp: float  # the dampening finally used (raised when Cholesky failed)
    # Per output row, the error the GPTQ walk left, tr(D H D^T) with the dampened Hessian (None: no
    # Hessian), and the value the dampening added to H's diagonal.
    walked_error: torch.Tensor | None = None
    damp_added: float = 0.0

    def rows(self, start: int, end: int) -> "QuantResult":
        """The result for output rows start:end (rows are quantized independently of each other)."""
        return QuantResult(
            codes=self.codes[start:end],
            scales=self.scales[:, start:end],
            zeros=self.zeros[:, start:end],
            g_idx=self.g_idx,
            salient_idx=self.salient_idx,
            salient_weight=self.salient_weight[start:end],
            bits=self.bits,
            damp=self.damp,
            walked_error=None if self.walked_error is None else self.walked_error[start:end],
            damp_added=self.damp_added,
        )

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] this result computes with, salient columns included."""
        g = self.g_idx.long()
        w = self.scales.t()[:, g] * (self.codes.float() - self.zeros.t()[:, g])
        w[:, self.salient_idx] = self.salient_weight.float()
        return w
