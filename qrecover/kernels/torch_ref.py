"""Reference forward of the mixed-precision linear layer, in plain torch, on any device.

y = x @ deq(qweight) + x[:, salient_idx] @ salient_weight^T (+ bias), where deq unpacks the
GPTQ v1 codes and zeros (qrecover.format) and applies each column's group scale.
"""
from __future__ import annotations

import torch


def mixed_linear(x, weight_t, salient_idx, salient_weight, bias) -> torch.Tensor:
    """x [..., in] @ weight_t [in, out] plus the 16-bit column correction and the bias."""
    return add_columns(x @ weight_t, x, salient_idx, salient_weight, bias)


def add_columns(y, x, salient_idx, salient_weight, bias) -> torch.Tensor:
    """y + x[..., salient_idx] @ salient_weight^T (+ bias): differentiable in salient_weight."""
    if salient_idx.numel():
        y = y + x[..., salient_idx.long()] @ salient_weight.to(x.dtype).t()
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output, its weight unpacked on this call: the reference the other paths match."""
    return mixed_linear(x, layer.dequantize_dense(x.dtype), layer.salient_idx, layer.salient_weight, layer.bias)
