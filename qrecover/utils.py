"""Small helpers shared by the layers above: atomic JSON files and peak memory."""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch


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
