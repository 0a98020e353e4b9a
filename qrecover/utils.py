"""Small helpers shared by the layers above: atomic JSON files and peak memory."""
from __future__ import annotations

import json
import os
import resource
import shutil
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
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def peak_memory_mb(device=None) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size otherwise."""
    if device is not None and torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def atomic_dir(target, build, overwrite: bool = False) -> Path:
    """Build a directory in a hidden folder beside `target`, then rename it into place, so nobody
    ever sees half of it. build(tmp_dir) writes the content; an existing target needs overwrite."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise QRecoverError(f"output path {target} exists; choose another or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
