"""Per-layer progress of a quantization in its work folder, so an interrupted run resumes at the
first unfinished layer: each finished decoder layer's tensors (layerNNNN.safetensors, under their
names in the model: the streaming path's output shards), the next layer's inputs (inputsNNNN/, one
file per calibration batch) and progress.json, written last."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import QuantConfig
from ..errors import QRecoverError
from ..models import Architecture
from ..nn import QuantLinear
from ..outputs import disk_errors
from ..resume import StateFile
from .activations import ActivationBudget, Activations


def resume_settings(config: QuantConfig, samples: torch.Tensor | None, streaming: bool) -> dict:
    calibration = None if samples is None else hashlib.sha256(samples.numpy().tobytes()).hexdigest()
    # The format of the saved layers' zero points, and their layout (whole layers under their full
    # names): a work folder of an older qrecover is refused, not misread.
    return {"quantization": config.to_dict(), "checkpoint_format": config.checkpoint_format, "calibration": calibration,
            "layout": "layers-v2", "streaming": streaming}


def layer_file(work_dir, index: int) -> Path:
    """The tensors of finished decoder layer `index`, under their names in the model."""
    return Path(work_dir) / f"layer{index:04d}.safetensors"


class LayerProgress:
    """The work folder of one quantization (None: nothing is kept, the run cannot resume)."""

    def __init__(self, work_dir, settings: dict):
        self.dir = Path(work_dir) if work_dir else None
        # Made at the first save, so a run refused before any layer is done leaves no folder behind.
        self.file = StateFile(self.dir and self.dir / "progress.json", settings, "an interrupted quantization")
        self.state = self.file.read() or {"done": 0, "layers": [], "seconds": 0.0}
        self.seconds_before = self.state["seconds"]  # work time of earlier, interrupted runs

    @property
    def done(self) -> int:
        return self.state["done"]

    def _inputs(self, index: int) -> Path:
        # Named by layer: a kill between writing them and progress.json must not pair one layer's
        # progress with the next layer's inputs.
        return self.dir / f"inputs{index:04d}"

    def restore_layers(self, layers, arch: Architecture, config: QuantConfig) -> None:
        """Put the finished layers back into an in-memory model as QuantLinears."""
        for i in range(self.done):
            tensors = load_file(layer_file(self.dir, i))
            for short in arch.linear_names:
                linear = layers[i].get_submodule(short)
                prefix = f"{arch.layers}.{i}.{short}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                bits = config.resolve(prefix[:-1], linear.in_features).bits
                layers[i].set_submodule(short, QuantLinear.from_tensors(own, bits, config.zero_offset))

    def restore_inputs(self, budget: ActivationBudget, device) -> Activations:
        folder = self._inputs(self.done)
        files = sorted(folder.glob("batch*.safetensors"))
        if not files:
            raise QRecoverError(f"{self.dir} lacks the inputs of layer {self.done}: delete {self.dir} to start over")
        return Activations.from_files(files, budget, device)

    def save(self, index: int, tensors: dict, batches: Activations | None, report: dict, elapsed: float) -> None:
        """Record layer `index` as done: its tensors (full names), the next layer's inputs, the report."""
        if self.dir is not None:
            with disk_errors(self.dir, sum(t.nbytes for t in tensors.values())):
                self.dir.mkdir(parents=True, exist_ok=True)
                tmp = layer_file(self.dir, index).with_suffix(".tmp")
                save_file(tensors, str(tmp))
                tmp.replace(layer_file(self.dir, index))
                if batches is not None:  # valid only once progress.json names this layer done
                    shutil.rmtree(self._inputs(index + 1), ignore_errors=True)
                    batches.save(self._inputs(index + 1))
        self.state["layers"].append(report)
        self.state["done"] = index + 1
        self.state["seconds"] = round(self.seconds_before + elapsed, 3)
        self.file.write(self.state)
        if self.dir is not None:
            shutil.rmtree(self._inputs(index), ignore_errors=True)
