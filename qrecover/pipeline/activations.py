"""Calibration activations between and inside decoder layers: one tensor per calibration batch, kept
in memory up to a budget shared by every set alive at once, written to disk (safetensors, in the
work folder) past it and read back on each use.

At 7B and 16 x 512 calibration tokens a set is 134 MB and about ten are alive inside a layer; at the
paper's 128 x 2048 tokens a set is 4.3 GB, more than most machines hold ten times over.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..outputs import disk_errors


def default_budget(device) -> int:
    """A quarter of the device's memory (a GPU's, or the machine's RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class ActivationBudget:
    """Bytes of activations in memory, against a limit; where the rest goes."""

    def __init__(self, limit_bytes: int, folder: Path | None = None):
        self.limit, self.used, self.spilled = limit_bytes, 0, 0
        self._folder, self._tmp = folder, None

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes

    def spill_path(self) -> Path:
        if self._folder is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="qrecover-activations-")
            self._folder = Path(self._tmp.name)
        self.spilled += 1
        (self._folder / "spill").mkdir(parents=True, exist_ok=True)
        return self._folder / "spill" / f"batch-{self.spilled:07d}.safetensors"


def write_tensor(path: Path, t: torch.Tensor) -> None:
    with disk_errors(path.parent, t.nbytes):
        tmp = path.with_name(path.name + ".tmp")
        save_file({"t": t.detach().contiguous().cpu()}, str(tmp))
        tmp.replace(path)


class Activations:
    """A sequence of tensors (one per calibration batch) under an ActivationBudget."""

    def __init__(self, budget: ActivationBudget, device):
        self.budget, self.device = budget, torch.device(device)
        self.entries: list[torch.Tensor | Path] = []
        self.spilled: set[Path] = set()  # files this set wrote (and deletes when released)
        self.dtype = None

    @classmethod
    def of(cls, tensors, budget: ActivationBudget, device) -> "Activations":
        acts = cls(budget, device)
        for t in tensors:
            acts.append(t)
        return acts

    @classmethod
    def from_files(cls, paths, budget: ActivationBudget, device) -> "Activations":
        """Saved batches (resume): read into memory where the budget allows, else read on each use."""
        acts = cls(budget, device)
        for path in paths:
            t = load_file(str(path), device=str(acts.device))["t"]
            acts.dtype = t.dtype
            acts.entries.append(t if budget.take(t.nbytes) else Path(path))
        return acts

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.dtype = t.dtype
        if self.budget.take(t.nbytes):
            self.entries.append(t)
        else:
            path = self.budget.spill_path()
            write_tensor(path, t)
            self.entries.append(path)
            self.spilled.add(path)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, j: int) -> torch.Tensor:
        entry = self.entries[j]
        return entry if isinstance(entry, torch.Tensor) else load_file(str(entry), device=str(self.device))["t"]

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    @property
    def on_disk(self) -> int:
        return sum(isinstance(e, Path) for e in self.entries)

    def save(self, folder: Path) -> None:
        """Every batch as folder/batchNNNN.safetensors (spilled files are moved, not copied)."""
        folder.mkdir(parents=True, exist_ok=True)
        for j, entry in enumerate(self.entries):
            target = folder / f"batch{j:04d}.safetensors"
            if isinstance(entry, Path):
                entry.replace(target)
                self.spilled.discard(entry)
                self.entries[j] = target
            else:
                write_tensor(target, entry)

    def release(self) -> None:
        """Free the memory and the spilled files."""
        for entry in self.entries:
            if isinstance(entry, torch.Tensor):
                self.budget.give(entry.nbytes)
            elif entry in self.spilled:
                entry.unlink(missing_ok=True)
        self.entries, self.spilled = [], set()
