"""Small helpers shared by the layers above: atomic JSON files, peak memory, sizes."""
from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import sys
import tempfile
from pathlib import Path

import torch

from .errors import QRecoverError


def atomic_write_json(path, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk or an interruption leaves no stray file
        raise


def peak_memory_mb(device=None) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40, "TB": 2**40}


def parse_size(value) -> int:
    """Bytes of a size: 4GB, 512MB, 1.5G (binary units), or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise QRecoverError(f"{value!r} is not a size such as 4GB, 512MB or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def return_freed_memory() -> None:
    """Hand the memory this process has freed back to the system. glibc keeps freed blocks below its
    (self-raising) mmap threshold in the heap, where a layer-by-layer run's resident memory grew by
    about a layer's size per layer from fragmentation alone (measured, docs/BENCHMARKS.md)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim
            pass


def native_bf16(device) -> bool:
    """Whether `device` multiplies bfloat16 in hardware; elsewhere autocast emulates it, slowly."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
