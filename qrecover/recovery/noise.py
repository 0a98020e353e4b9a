"""Quantization noise injection (QNI) for GIFT-SW recovery, and the frozen matmul that carries it.

In training, a layer's frozen part computes with W + E, where E_ij ~ N(0, (s * Delta_ij / 2)^2)
(or U(-s * Delta_ij / 2, s * Delta_ij / 2)) is fresh at every training step and Delta_ij is the
quantization step of the row and group of element ij. Salient columns get no noise.

Memory: by default nothing is kept for the backward pass. The frozen weight is rebuilt from its
packed form and the noise regenerated from a seed, in forward and again in backward; the cost is
one extra dequantization and one extra draw per layer and step, and no full-precision copy of the
model. With cached weights (recover's cache_weights) a layer keeps its dequantized weight for the
whole run and W + E until backward: two float32 copies of the quantized weights, about a third
faster steps on CPU.
The seed is a function of (run seed, training step, layer), so recomputation under gradient
checkpointing sees the same noise, and a resumed run draws exactly what the uninterrupted one did.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class NoiseConfig:
    kind: str = "gaussian"
    scale: float = 1.0  # multiplies Delta / 2
    bits: int | None = None  # fixed noise bit width: Delta from a per-row b-bit grid instead of the layer's


class NoiseClock:
    """The training step the noise is drawn for; the trainer advances it, layers read it."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.step = 0

    def seed_for(self, layer_id: int) -> int:
        return ((self.seed * 1_000_003 + self.step) * 65_537 + layer_id) % (2**63 - 1)


def draw(delta: torch.Tensor, shape, kind: str, scale: float, seed: int) -> torch.Tensor:
    """Float32 noise of `shape` with per-element step delta (broadcastable), reproducible from seed.

    Always drawn in float32: forward and backward may run in different dtypes (under autocast the
    gradient is often bfloat16), and both must see the same noise, rounded to their dtype.
    """
    gen = torch.Generator(device=delta.device).manual_seed(seed)
    half_step = delta.float() * (scale / 2)
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, device=delta.device) * half_step
    return (torch.rand(shape, generator=gen, device=delta.device) * 2 - 1) * half_step


class _FrozenMatmul(torch.autograd.Function):
    """x @ W for a frozen W built by make_weight; backward rebuilds it (noise redrawn) or reuses a kept one."""

    @staticmethod
    def forward(ctx, x, make_weight, seed, keep):
        w = make_weight(x.dtype, seed)
        ctx.make_weight, ctx.seed, ctx.kept = make_weight, seed, w if keep else None
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        w = ctx.kept.to(grad.dtype) if ctx.kept is not None else ctx.make_weight(grad.dtype, ctx.seed)
        return grad @ w.t(), None, None, None


def frozen_matmul(x, frozen_t, delta_t, salient_idx: torch.Tensor, noise: NoiseConfig | None, seed: int, keep: bool = False):
    """x @ (frozen_t(dtype) + E) for a frozen [in, out] weight; E is zero on the salient input rows,
    and zero everywhere when noise is None or off.

    frozen_t: dtype -> [in, out] tensor; delta_t: () -> Delta broadcastable to [in, out]. keep: hold
    W + E until backward (a weight-sized copy per layer for the step) instead of rebuilding it.
    """
    noisy = noise is not None and noise.kind != "none" and noise.scale > 0

    def make_weight(dtype, seed_):
        w = frozen_t(dtype)
        if not noisy:
            return w
        e = draw(delta_t(), w.shape, noise.kind, noise.scale, seed_)
        e[salient_idx.long()] = 0
        return w + e.to(dtype)

    # Without noise W is kept for backward, as a plain matmul would keep it: nothing to redraw.
    return _FrozenMatmul.apply(x, make_weight, seed, keep or not noisy)


def row_step(weight_t: torch.Tensor, salient_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Delta [1, out] of a per-row symmetric b-bit grid (MSE clip) fitted on the non-salient rows of weight_t [in, out]."""
    from ..quant.grid import fit_grid

    keep = torch.ones(weight_t.shape[0], dtype=torch.bool, device=weight_t.device)
    keep[salient_idx.long()] = False
    scale, _ = fit_grid(weight_t[keep].t().float(), bits, sym=True, mse=True)
    return scale.t()
