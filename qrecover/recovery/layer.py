"""A salient layer under recovery: the wrapper that owns its training state (start, finish, merge).

`RecoveryLayer(base, ...)` takes the place of a QuantLinear or a SalientLinear while it trains, as a
peft tuner layer takes the place of its base layer: the base stays frozen and untouched, the wrapper
holds the trainable float32 copy of its salient columns and computes

    y = x @ (W_frozen + E) + x[:, salient_idx] @ salient_weight^T + bias

with E the quantization noise of noise.py in training mode and E = 0 in eval mode. With scale training
(EfficientQAT's end-to-end training of the quantization parameters) the step of every group is
trained too, as scales * scale_factor, over the fixed integer codes: no noise then, since the weight
is no longer frozen. `finish()` writes the trained columns (and scales) back into the base, in their
storage dtype, and returns it.

`SalientLinear` is an ordinary nn.Linear split the same way, for GIFT-SW as a parameter-efficient
fine-tuning method on an unquantized model; `merged()` turns it back into an nn.Linear.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..format import dequantize_weight
from ..kernels import torch_ref
from ..nn import QuantLinear
from .noise import NoiseClock, NoiseConfig, frozen_matmul, row_step


class SalientLinear(nn.Module):
    """An nn.Linear whose salient input columns are held apart from the rest.

    Its noise step is that of a per-row symmetric `step_bits`-bit grid of the other columns: the
    noise a quantizer of that width would cause (GIFT-SW used as PEFT).
    """

    def __init__(self, linear: nn.Linear, salient_idx: torch.Tensor, step_bits: int = 4):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        idx = salient_idx.long().to(linear.weight.device)
        weight_t = linear.weight.detach().t().clone()
        self.salient_weight = nn.Parameter(weight_t[idx].t().clone(), requires_grad=False)
        weight_t[idx] = 0
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("salient_idx", idx.to(torch.int32))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("step", row_step(weight_t, idx, step_bits), persistent=False)

    @property
    def n_salient(self) -> int:
        return self.salient_idx.numel()

    def frozen_t(self, dtype) -> torch.Tensor:
        return self.weight_t.to(dtype)

    def own_step(self) -> torch.Tensor:
        return self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_ref.mixed_linear(x, self.frozen_t(x.dtype), self.salient_idx, self.salient_weight, self.bias)

    def merged(self) -> nn.Linear:
        """The plain nn.Linear with the salient columns written back."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight_t.device, dtype=self.weight_t.dtype)
        weight_t = self.weight_t.clone()
        weight_t[self.salient_idx.long()] = self.salient_weight.detach().t().to(weight_t.dtype)
        out.weight.data.copy_(weight_t.t())
        if self.bias is not None:
            out.bias.data.copy_(self.bias)
        return out


SALIENT_LAYERS = (QuantLinear, SalientLinear)


class RecoveryLayer(nn.Module):
    """A QuantLinear or SalientLinear in training: `salient_weight` (float32) is trainable, and with
    train_scales (QuantLinear only) `scale_factor`, one float32 factor per group and output."""

    def __init__(self, base: nn.Module, noise: NoiseConfig, clock: NoiseClock, layer_id: int, train_scales: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        # A layer without columns trains none (under DDP a parameter without a gradient is an error).
        self.salient_weight = nn.Parameter(base.salient_weight.detach().float(), requires_grad=base.n_salient > 0)
        self.noise, self.clock, self.layer_id = noise, clock, layer_id
        # A fixed noise bit width takes Delta from its own per-row grid of the frozen part.
        self.fixed_step = row_step(base.frozen_t(torch.float32), base.salient_idx, noise.bits) if noise.bits else None
        self.scale_factor = nn.Parameter(torch.ones(base.scales.shape)) if train_scales else None
        if train_scales:  # code - zero of every weight, as int8: the part of the dense weight that stays fixed
            units = dequantize_weight(base.qweight, base.qzeros, torch.ones_like(base.scales), base.g_idx, base.bits,
                                      base.in_features, base.zero_offset, torch.float32)
            self.register_buffer("units_t", units.to(torch.int8), persistent=False)

    @property
    def n_salient(self) -> int:
        return self.base.n_salient

    def noise_step(self) -> torch.Tensor:
        return self.fixed_step if self.fixed_step is not None else self.base.own_step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.scale_factor is not None:
            step_t = (base.scales.float() * self.scale_factor)[base.g_idx.long()]
            return torch_ref.mixed_linear(x, (self.units_t * step_t).to(x.dtype), base.salient_idx, self.salient_weight, base.bias)
        noise = self.noise if self.training else None
        # A layer that holds its dense weight has traded memory for speed already: keep W + E too.
        keep = isinstance(base, QuantLinear) and kernels.holds_dense(base)
        y = frozen_matmul(x, base.frozen_t, self.noise_step, base.salient_idx, noise, self.clock.seed_for(self.layer_id), keep)
        return torch_ref.add_columns(y, x, base.salient_idx, self.salient_weight, base.bias)

    def finish(self) -> nn.Module:
        """The base layer with the trained columns (and scales) written in, in their storage dtype."""
        dtype = self.base.salient_weight.dtype
        self.base.salient_weight = nn.Parameter(self.salient_weight.detach().to(dtype), requires_grad=False)
        if self.scale_factor is not None:
            self.base.scales.copy_((self.base.scales.float() * self.scale_factor.detach()).to(self.base.scales.dtype))
            kernels.hold_dense(self.base, None)  # a held dense copy has the old scales
        return self.base
