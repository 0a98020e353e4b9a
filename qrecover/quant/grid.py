"""Uniform b-bit grid: one (scale, zero) per row of the block it is fitted on.

Codes are integers in [0, 2^b - 1]; a code q stands for scale * (q - zero). Symmetric grids put
zero at 2^(b-1) (the GPTQ convention), asymmetric ones fit it to [min, max]. The optional MSE clip
shrinks the range by the factor that minimizes sum (w - Q(w))^2 per row.
Scales are rounded to float16 as soon as they are fitted, since that is how the checkpoint stores
them: the quantizer and the saved model then agree to the last bit.
"""
from __future__ import annotations

import torch

from ..format import MIN_ZERO

# The clip search tries ranges p * [min, max]: a coarse pass over p = 1, 0.95, ..., 0.25, then
# steps of 0.01 around each row's best coarse p (25 trials instead of 80 for the same resolution).
COARSE = 1.0 - torch.arange(16) * 0.05
FINE = torch.arange(-4, 5) * 0.01
TRIAL_ELEMENTS = 2**20  # trials x rows x cols at once (rows are split beyond it): 4 MB stays in cache, 3x faster than 128 MB
MIN_SCALE = torch.finfo(torch.float16).tiny


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, out=None) -> torch.Tensor:
    """Integer codes (as floats) of w on the grid; `out` (may be w's own shape) avoids an allocation."""
    return torch.div(w, scale, out=out).round_().add_(zero).clamp_(0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out=None) -> torch.Tensor:
    """scale * (codes - zero); `out` may be codes itself."""
    return torch.sub(codes, zero, out=out).mul_(scale)


def quantize_dequantize(w, scale, zero, maxq):
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def _range_to_grid(lo, hi, maxq: int, sym: bool):
    scale = ((hi - lo) / maxq).half().float().clamp(min=MIN_SCALE)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # Never below what GPTQ v1 holds: every checkpoint converts between v1 and v2 without loss.
        zero = torch.round(-lo / scale).clamp(MIN_ZERO, maxq)
    return scale, zero


def fit_grid(w: torch.Tensor, bits: int, sym: bool, mse: bool):
    """(scale, zero), each [rows, 1], for the float32 block w [rows, cols]."""
    rows_at_once = max(1, TRIAL_ELEMENTS // (len(COARSE) * w.shape[1]))
    if mse and w.shape[0] > rows_at_once:
        parts = [fit_grid(chunk, bits, sym, mse) for chunk in w.split(rows_at_once)]
        return torch.cat([s for s, _ in parts]), torch.cat([z for _, z in parts])
    maxq = 2**bits - 1
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = torch.where(empty, -torch.ones_like(lo), lo)
    hi = torch.where(empty, torch.ones_like(hi), hi)
    scale, zero = _range_to_grid(lo, hi, maxq, sym)
    if not mse:
        return scale, zero

    p = _best_shrink(w, lo, hi, COARSE.to(w).view(-1, 1, 1), maxq, sym)
    p = _best_shrink(w, lo, hi, (p + FINE.to(w).view(-1, 1, 1)).clamp(0.2, 1.0), maxq, sym)
    return _range_to_grid(p * lo, p * hi, maxq, sym)


def _best_shrink(w, lo, hi, shrinks, maxq: int, sym: bool):
    """The shrink factor [rows, 1] among shrinks [P, rows or 1, 1] with the least squared error."""
    s, z = _range_to_grid(shrinks * lo, shrinks * hi, maxq, sym)
    q = quantize(w, s, z, maxq)  # one [P, rows, cols] buffer, reused for the error
    err = dequantize(q, s, z, out=q).sub_(w).square_().sum(dim=2, keepdim=True)
    best = err.argmin(dim=0, keepdim=True)
    return shrinks.expand_as(err).gather(0, best).squeeze(0)
