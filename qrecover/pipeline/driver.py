"""The layer-by-layer quantization of a whole model.

The calibration batches enter decoder layer 0 once (captured at its input); after that one decoder
layer at a time is on the compute device and is quantized there (layer.py). The model is either in
memory (its layers move to the device and back) or streamed (`shards`: the model is on the meta
device, each layer's tensors are read from the safetensors files when its turn comes and freed when
it is done; its packed tensors are the work folder's layer files, which become the checkpoint's shards).

Round to nearest without salient columns reads only the weights: then no calibration data enters
and every linear is rounded where it is.

With a work directory the driver saves each finished layer and the next layer's inputs
(progress.py), so an interrupted run resumes at the first unfinished layer.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..errors import QRecoverError
from ..models import architecture
from ..models.shards import Shards, materialize, release
from ..utils import peak_memory_mb, return_freed_memory
from .activations import ActivationBudget, Activations, default_budget
from .layer import capture_inputs, quantize_layer
from .progress import LayerProgress, resume_settings


@contextmanager
def _outside_layers(model, arch, shards: Shards | None, device):
    """The parts the calibration capture runs outside the decoder layers (embeddings, norms, rotary
    tables); streamed, they are read from the shards for the capture and freed after it."""
    base_name, _, layers_name = arch.layers.rpartition(".")
    parts = {n: m for n, m in model.get_submodule(base_name).named_children() if n != layers_name}
    if shards is not None:
        for name, part in parts.items():
            materialize(part, f"{base_name}.{name}.", shards, "cpu")
    try:
        yield
    finally:
        if shards is not None:
            for part in parts.values():
                release(part)


def quantize_model(
    model,
    samples: torch.Tensor | None,
    config: QuantConfig,
    device=None,
    batch_size: int = 8,
    work_dir=None,
    salient_dtype=torch.float16,
    progress: bool = True,
    shards: Shards | None = None,
    activation_memory: int | None = None,
) -> dict:
    """Quantize every decoder linear of `model` in place (streamed from `shards`: into the work
    folder's layer files); returns the run report.

    `samples` (token ids, samples x seqlen) may be None only when the config needs no calibration.
    activation_memory: bytes of calibration activations kept in memory (default: a quarter of the
    device's memory); the rest goes to disk in the work folder.
    """
    if samples is None and config.needs_calibration:
        raise QRecoverError(
            "GPTQ and salient columns need calibration samples; pass token ids, or use method='rtn' with salient=0"
        )
    if shards is not None and work_dir is None:
        raise QRecoverError("a streamed quantization writes its layers into a work folder: pass work_dir")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home = torch.device("cpu") if device.type == "cuda" else device
    arch = architecture(model)
    layers = model.get_submodule(arch.layers)
    resume = LayerProgress(work_dir, resume_settings(config, samples, shards is not None))
    budget = ActivationBudget(activation_memory or default_budget(device), resume.dir)
    start = time.perf_counter()
    resumed = resume.done
    if resumed:
        print(f"qrecover: resuming the interrupted quantization in {resume.dir}: {resume.done} of {len(layers)} "
              f"layers were done ({resume.seconds_before:.1f} s of work)", file=sys.stderr)
        if shards is None:
            resume.restore_layers(layers, arch, config)
    batches = kwargs = None
    if samples is not None:
        with _outside_layers(model, arch, shards, device):
            # A resumed run needs only each layer's other arguments (masks, rotary tables): one sample.
            hidden, kwargs = capture_inputs(model, samples[:1] if resumed else samples, device, 1 if resumed else batch_size)
        batches = resume.restore_inputs(budget, device) if resumed else Activations.of(hidden, budget, device)
        del hidden
    bar = tqdm(range(len(layers)), desc="quantizing layers", initial=resume.done, disable=not progress)
    for i in range(resume.done, len(layers)):
        layer_start = time.perf_counter()
        prefix = f"{arch.layers}.{i}"
        if shards is not None:
            materialize(layers[i], prefix + ".", shards, device)
        layer = layers[i].to(device)
        generator = torch.Generator().manual_seed(config.seed + i)  # per layer, so a resumed run draws the same
        reports, outputs = quantize_layer(layer, arch, prefix, batches, kwargs and kwargs[i], config, generator, salient_dtype)
        if outputs is not None and not all(torch.isfinite(b.sum()) for b in outputs):
            raise QRecoverError(f"the outputs of quantized layer {i} contain NaN or Inf; try --dtype float32")
        if batches is not None:
            batches.release()
        batches = outputs
        tensors = {f"{prefix}.{k}": v.contiguous().cpu() for k, v in layer.state_dict().items()} if resume.dir else {}
        layers[i] = release(layer) if shards is not None else layer.to(home)
        return_freed_memory()
        report = {"index": i, "seconds": round(time.perf_counter() - layer_start, 3), "modules": reports}
        resume.save(i, tensors, batches, report, time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(err=f"{sum(r['error'] for r in reports) / len(reports):.2e}")
    bar.close()
    if batches is not None:
        batches.release()
    return {
        "settings": config.to_dict(),
        "calibration": {"samples": samples.shape[0], "seqlen": samples.shape[1]} if samples is not None else None,
        "error": "output" if samples is not None else "weight",
        "device": str(device),
        "loading": "stream" if shards is not None else "whole",
        "activations_spilled": budget.spilled,
        "seconds": round(resume.seconds_before + time.perf_counter() - start, 2),  # every run's work
        "resumed": {"layers_done": resumed, "seconds_before": resume.seconds_before} if resumed else None,
        "peak_memory_mb": peak_memory_mb(device),
        "layers": resume.state["layers"],
    }
