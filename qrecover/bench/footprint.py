"""Real bits per weight of a quantized checkpoint: everything its quantized linears store.

Codes, scales, zero points, group indices, 16-bit salient columns and biases all count, divided by
the number of weights of those linears (in x out). Read from the safetensors headers only, so it
works for qrecover, GPTQ and AWQ checkpoints alike without loading a tensor.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

from ..errors import QRecoverError

_DTYPE_BITS = {"I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "BOOL": 8}


def safetensors_header(path: Path) -> dict:
    """name -> {dtype, shape} of a .safetensors file, read from its header (no tensor is loaded)."""
    with safe_open(path, framework="pt") as f:
        return {name: {"dtype": (t := f.get_slice(name)).get_dtype(), "shape": t.get_shape()} for name in f.keys()}


def _tensor_bits(info: dict) -> int:
    count = 1
    for dim in info["shape"]:
        count *= dim
    return count * _DTYPE_BITS[info["dtype"]]


def stored_bits(checkpoint, adapter: bool = False) -> tuple[int, int]:
    """(stored bits of the quantized linears, their number of weights) of a checkpoint directory.

    adapter=True counts every tensor of a peft adapter directory instead (weights: 0).
    """
    pattern = "adapter_model.safetensors" if adapter else "*.safetensors"
    files = sorted(Path(checkpoint).glob(pattern))
    if not files:
        raise QRecoverError(f"{checkpoint} holds no {pattern} file")
    headers = [safetensors_header(path) for path in files]
    if adapter:
        return sum(_tensor_bits(info) for header in headers for info in header.values()), 0
    modules = defaultdict(dict)
    for header in headers:
        for name, info in header.items():
            prefix, _, leaf = name.rpartition(".")
            modules[prefix][leaf] = info
    bits = weights = 0
    for tensors in modules.values():
        if "qweight" not in tensors:
            continue
        out_f = tensors["scales"]["shape"][-1]
        in_f = tensors["g_idx"]["shape"][0] if "g_idx" in tensors else tensors["qweight"]["shape"][0]
        weights += in_f * out_f
        bits += sum(_tensor_bits(info) for info in tensors.values())
    if not weights:
        raise QRecoverError(f"{checkpoint} has no quantized linear layer (no `qweight` tensor)")
    return bits, weights


def bits_per_weight(checkpoint) -> float:
    """Stored bits of the quantized linears divided by their number of weights."""
    bits, weights = stored_bits(checkpoint)
    return bits / weights
