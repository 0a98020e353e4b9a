"""Backends that compute the mixed-precision linear layer, and the choice between them.

`mixed_linear(layer, x)` is the one entry point the module calls. Backends:
    torch    plain torch ops on any device (torch_mm; torch_ref when the layer holds its dense weight)
    triton   the Triton kernels (triton_mm): CUDA tensors, or any under TRITON_INTERPRET=1
"auto" (the default) takes triton for float16/bfloat16 inputs on CUDA when triton imports, and torch
otherwise, including whenever salient_weight needs a gradient (triton is inference-only).
`use_backend(name)` forces one within a block; the environment variable QRECOVER_BACKEND sets the
default for a whole process. The kernels own every weight kept between calls: `hold_dense(layer)`
keeps the dequantized dense part (memory for speed), `dense_weight(layer, dtype)` gives it.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import QRecoverError
from . import cache, torch_mm, torch_ref

BACKENDS = ("auto", "torch", "triton")
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16)

_forced: list[str] = []


@contextlib.contextmanager
def use_backend(name: str):
    """Run the layers inside the block on backend name ("auto", "torch" or "triton")."""
    _check_name(name, "use_backend")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def hold_dense(layer, dtype: torch.dtype | None = torch.float32) -> None:
    """Keep the layer's dense part dequantized to dtype between calls (a full copy), or with None
    drop it. While held, the torch backend multiplies by it and "auto" never picks triton."""
    cache.hold(layer, None if dtype is None else layer.dequantize_dense(dtype))


def holds_dense(layer) -> bool:
    return cache.held(layer) is not None


def dense_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The dense part [in, out] in dtype: the held copy when there is one, else unpacked now."""
    held = cache.held(layer)
    return held.to(dtype) if held is not None else layer.dequantize_dense(dtype)


def _check_name(name: str, where: str) -> None:
    if name not in BACKENDS:
        raise QRecoverError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def current_backend() -> str:
    name = _forced[-1] if _forced else os.environ.get("QRECOVER_BACKEND", "auto")
    _check_name(name, "QRECOVER_BACKEND")
    return name


def triton_problem(device: torch.device) -> str | None:
    """Why the triton backend cannot run on device, or None if it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'qrecover[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels need CUDA tensors (these are on {device}; TRITON_INTERPRET=1 runs them on the CPU, slowly)"
    return None


def available_backends(device: torch.device) -> list[str]:
    return ["torch"] + (["triton"] if triton_problem(device) is None else [])


def _check_input(layer, x: torch.Tensor) -> None:
    if x.device != layer.qweight.device:
        raise QRecoverError(
            f"the input is on {x.device} but the layer's weights are on {layer.qweight.device}; "
            "move the input or the model to one device"
        )
    if x.dtype not in TORCH_DTYPES:
        raise QRecoverError(f"input dtype {x.dtype} is not supported; use one of {_names(TORCH_DTYPES)}")
    if x.shape[-1:] != (layer.in_features,):
        raise QRecoverError(
            f"the input's last dimension is {tuple(x.shape)[-1:]} but the layer has in_features={layer.in_features} "
            f"(a {layer.in_features}->{layer.out_features} layer)"
        )


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def choose(layer, x: torch.Tensor) -> str:
    """The backend that computes layer(x), after checking x against the layer."""
    _check_input(layer, x)
    name = current_backend()
    needs_grad = torch.is_grad_enabled() and layer.salient_weight.requires_grad
    if name == "auto":
        fast = x.device.type == "cuda" and x.dtype in TRITON_DTYPES and not needs_grad
        return "triton" if fast and triton_problem(x.device) is None and not holds_dense(layer) else "torch"
    if name == "triton":
        problem = triton_problem(x.device)
        if problem:
            raise QRecoverError(
                f"backend 'triton' is not available here: {problem}; available: {', '.join(available_backends(x.device))}"
            )
        if x.dtype not in TRITON_DTYPES:
            raise QRecoverError(f"backend 'triton' takes {_names(TRITON_DTYPES)} inputs, not {x.dtype}; cast x or use backend 'torch'")
        if needs_grad:
            raise QRecoverError("backend 'triton' is inference-only but salient_weight requires grad; use backend 'torch' or torch.no_grad()")
    return name


def mixed_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x @ deq(layer)^T + x[:, salient_idx] @ salient_weight^T (+ bias)."""
    backend = choose(layer, x)
    if backend == "triton":
        from . import triton_mm  # imported on first use: triton is optional

        return triton_mm.forward(layer, x)
    if holds_dense(layer):
        return torch_ref.mixed_linear(x, dense_weight(layer, x.dtype), layer.salient_idx, layer.salient_weight, layer.bias)
    return torch_mm.forward(layer, x)
