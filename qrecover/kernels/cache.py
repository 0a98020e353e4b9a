"""Weights the backends keep for a layer: values derived from its buffers, kept until one of those
buffers changes, and the dense weight a caller asked to hold (kept until it is released).

Kept beside the layer (a weak dictionary keyed by it), not on it: nothing is added to the module, its
state dict or its copies. An entry is stale once a source buffer is replaced (load_state_dict into a
new tensor, .to(device)) or modified in place (the tensor's version counter moves).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

_entries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_held: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _version(t: torch.Tensor) -> int:
    # Inference-mode tensors have no version counter; they cannot be changed outside inference mode.
    return -1 if t.is_inference() else t._version


def derived(layer, name: str, sources: list[torch.Tensor], compute: Callable):
    """compute(), remembered for this layer under name until a tensor in sources changes."""
    entries = _entries.setdefault(layer, {})
    hit = entries.get(name)
    if hit is not None:
        stamp, value = hit
        if len(stamp) == len(sources) and all(ref() is t and v == _version(t) for (ref, v), t in zip(stamp, sources)):
            return value
    value = compute()
    entries[name] = ([(weakref.ref(t), _version(t)) for t in sources], value)
    return value


def hold(layer, weight: torch.Tensor | None) -> None:
    """Keep weight for this layer until hold(layer, None)."""
    if weight is None:
        _held.pop(layer, None)
    else:
        _held[layer] = weight


def held(layer) -> torch.Tensor | None:
    return _held.get(layer)
