"""The mixed-precision linear layer: a packed low-bit dense part plus 16-bit salient input columns.

Tensors follow checkpoint format v1 (docs/FORMAT.md): qweight, qzeros, scales, g_idx in the GPTQ
layout (qzeros as GPTQ v1 or v2 store them: `zero_offset`), salient_idx and salient_weight for the
columns kept in 16-bit. The codes at salient
positions are the zero point, so y = deq(qweight) x + salient_weight x[salient_idx].

Recovery wraps the layer (recovery/layer.py) to train its columns; the layer itself only computes.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .errors import QRecoverError
from .format import ZERO_OFFSETS, QuantResult, dequantize_weight, pack_codes, pack_zeros, packed_length, unpack_zeros


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_groups: int,
        n_salient: int,
        bias: bool,
        salient_dtype: torch.dtype = torch.float16,
        zero_offset: int = ZERO_OFFSETS["gptq"],
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.zero_offset = zero_offset  # qzeros holds zero - zero_offset (format.ZERO_OFFSETS)
        self.register_buffer("qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_length(out_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("salient_idx", torch.zeros(n_salient, dtype=torch.int32))
        self.salient_weight = nn.Parameter(torch.zeros(out_features, n_salient, dtype=salient_dtype), requires_grad=False)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_tensors(cls, tensors: dict, bits: int, zero_offset: int) -> "QuantLinear":
        """A layer holding checkpoint tensors (keys without the module prefix), checked against bits."""
        missing = {"qweight", "qzeros", "scales", "g_idx", "salient_idx", "salient_weight"} - set(tensors)
        if missing:
            raise QRecoverError(f"missing tensors {sorted(missing)}")
        in_f, (n_groups, out_f) = tensors["g_idx"].numel(), tensors["scales"].shape
        m = cls(in_f, out_f, bits, n_groups, tensors["salient_idx"].numel(), "bias" in tensors,
                tensors["salient_weight"].dtype, zero_offset)
        for key, value in m.state_dict().items():
            if tensors[key].shape != value.shape or tensors[key].dtype != value.dtype:
                raise QRecoverError(
                    f"{key} is {tuple(tensors[key].shape)} {tensors[key].dtype}, expected {tuple(value.shape)} "
                    f"{value.dtype} for a {bits}-bit {in_f}->{out_f} layer"
                )
        unknown = set(tensors) - set(m.state_dict())
        if unknown:
            raise QRecoverError(f"unexpected tensors {sorted(unknown)}")
        m.load_state_dict(tensors)
        return m

    @classmethod
    def from_result(cls, result: QuantResult, bias: torch.Tensor | None, salient_dtype=torch.float16,
                    zero_offset: int = ZERO_OFFSETS["gptq"]) -> "QuantLinear":
        out_f, in_f = result.codes.shape
        m = cls(in_f, out_f, result.bits, result.scales.shape[0], len(result.salient_idx), bias is not None,
                salient_dtype, zero_offset)
        m.qweight.copy_(pack_codes(result.codes.t(), result.bits))
        m.set_zeros(result.zeros)
        m.scales.copy_(result.scales.half())
        m.g_idx.copy_(result.g_idx)
        m.salient_idx.copy_(result.salient_idx)
        m.salient_weight.data.copy_(result.salient_weight.to(salient_dtype))
        if bias is not None:
            m.bias.copy_(bias.detach().half())
        return m.to(result.codes.device)

    def dequantize_dense(self, dtype=torch.float32) -> torch.Tensor:
        """The low-bit part as a dense [in, out] matrix (zero at salient columns)."""
        return dequantize_weight(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features, self.zero_offset, dtype
        )

    def zeros(self) -> torch.Tensor:
        """The integer zero points [n_groups, out] (int64)."""
        return unpack_zeros(self.qzeros, self.bits, self.out_features, self.zero_offset)

    def set_zeros(self, zeros: torch.Tensor, zero_offset: int | None = None) -> None:
        """Store integer zero points [n_groups, out], as zero - zero_offset (default: the layer's own)."""
        if zero_offset is not None:
            self.zero_offset = zero_offset
        self.qzeros.copy_(pack_zeros(zeros, self.bits, self.zero_offset))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The full weight [out, in] the layer computes with, like nn.Linear.weight."""
        w = self.dequantize_dense(dtype).t().contiguous()
        w[:, self.salient_idx.long()] = self.salient_weight.to(dtype)
        return w

    def hold_dense(self, hold: bool, dtype=torch.float32) -> None:
        """Keep the dense part dequantized to dtype between calls (a full copy: memory for speed)."""
        kernels.hold_dense(self, dtype if hold else None)

    def frozen_t(self, dtype=torch.float32) -> torch.Tensor:
        """The frozen dense part [in, out]: the held copy when there is one, else unpacked now."""
        return kernels.dense_weight(self, dtype)

    def own_step(self) -> torch.Tensor:
        """Delta [in, out]: the quantization step of every weight."""
        return self.scales[self.g_idx.long()]

    @property
    def n_salient(self) -> int:
        return self.salient_idx.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.mixed_linear(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groups={self.scales.shape[0]}, salient={self.n_salient}, bias={self.bias is not None}"
        )


def hold_dense_weights(model: nn.Module, hold: bool) -> None:
    """Keep (hold=True, float32) or drop the dequantized dense part of every QuantLinear in model."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.hold_dense(hold)
