"""Layer-by-layer quantization driver.

The calibration batches enter decoder layer 0 once (captured at its input); after that only one
decoder layer is on the compute device at a time. Within a layer the linears are quantized in
sub-groups (q/k/v, o, gate/up, down), each seeing inputs computed by the already-quantized ones
(true sequential): a forward pass stops as soon as the next sub-group's input has been observed.
The quantized layer then maps its inputs to the next layer's inputs.

Round to nearest without salient columns reads only the weights: then no calibration data enters
and every linear is rounded where it is.

With a work directory the driver saves each finished layer and the next layer's inputs, so an
interrupted run resumes at the first unfinished layer.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import QuantConfig
from .errors import QRecoverError
from .models import Architecture, architecture
from .nn import QuantLinear, hold_dense_weights
from .observer import InputStats
from .outputs import disk_errors
from .quant.gptq import gptq_quantize, output_error
from .saliency import column_scores, select_salient
from .resume import StateFile
from .utils import peak_memory_mb


class _InputSeen(Exception):
    """Raised by a hook to stop a forward pass once the input it waited for has been recorded."""


def capture_inputs(model, samples: torch.Tensor, device, batch_size: int):
    """Hidden states entering the first decoder layer, one tensor per batch, and each layer's other
    arguments (rotary tables, masks: sliding-window layers get their own).

    The other arguments come from a one-sample pass in which every layer passes its input through,
    so they broadcast over batches of any size and no layer needs to be on the device.
    """
    arch = architecture(model)
    base_name, _, layers_name = arch.layers.rpartition(".")
    base, layers = model.get_submodule(base_name), model.get_submodule(arch.layers)
    hidden_seen, kwargs_seen = [], []

    def stand_in(*args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(kwargs_seen) < len(layers):
            kwargs_seen.append(kwargs)
            if len(kwargs_seen) < len(layers):
                return hidden
        else:
            hidden_seen.append(hidden.detach())
        raise _InputSeen

    # Only what runs outside the layers (embeddings, rotary tables) has to be on the device.
    outside = [m for n, m in base.named_children() if n != layers_name]
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    for m in outside:
        m.to(device)
    for layer in layers:
        layer.forward = stand_in
    try:
        with torch.no_grad():
            for batch in [samples[:1], *samples.split(batch_size)]:
                try:
                    base(input_ids=batch.to(device), use_cache=False)
                except _InputSeen:
                    pass
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
        for m, home in zip(outside, homes):
            m.to(home)
    return hidden_seen, kwargs_seen


def _layer_forward(layer, x, kwargs):
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class LayerPasses:
    """Runs the calibration batches through one decoder layer as often as its sub-groups need.

    A block (attention, MLP) whose last linear has been quantized is not recomputed: its outputs
    are that linear applied to the inputs recorded while observing it, and later passes replay them.
    Every linear is then computed once per batch with its final weights, as in a single forward.
    """

    def __init__(self, layer, batches, kwargs):
        self.layer, self.batches, self.kwargs = layer, batches, kwargs
        self.replays = {}  # block name -> (outputs per batch, returns a tuple)

    def observe(self, module, name: str, rho: float, keep_inputs: bool = False):
        """(input statistics, inputs per batch if kept) of one linear of the layer; passes stop there."""
        stats = InputStats(module.in_features, rho, hessian=True, device=self.batches[0].device, name=name)
        inputs = []

        def hook(mod, args):
            stats.add(args[0])
            if keep_inputs:
                inputs.append(args[0])
            raise _InputSeen

        self._run(module.register_forward_pre_hook(hook))
        stats.check_finite()
        return stats, inputs

    def replay_block(self, block: str, last, inputs: list, returns_tuple: bool) -> None:
        with torch.no_grad():
            self.replays[block] = ([last(x) for x in inputs], returns_tuple)

    def outputs(self) -> list:
        """The layer's outputs, one tensor per batch."""
        return self._run(None)

    def _run(self, handle) -> list:
        for block, (outs, returns_tuple) in self.replays.items():
            replayed = iter(outs)
            module = self.layer.get_submodule(block)
            if returns_tuple:
                module.forward = lambda *a, _it=replayed, **k: (next(_it), None)
            else:
                module.forward = lambda *a, _it=replayed, **k: next(_it)
        outs = []
        try:
            with torch.no_grad():
                for x in self.batches:
                    try:
                        outs.append(_layer_forward(self.layer, x, self.kwargs))
                    except _InputSeen:
                        pass
        finally:
            if handle is not None:
                handle.remove()
            for block in self.replays:
                del self.layer.get_submodule(block).forward  # back to the class's forward
        return outs


def quantize_linears(modules: dict, prefix: str, stats: InputStats | None, config: QuantConfig, generator, salient_dtype):
    """{short name: (QuantLinear, report)} for nn.Linears that read the same inputs (one InputStats;
    None when the config needs no calibration, and the reported error is then the weight error).

    Modules that also share bits, group size and salient columns are solved as one GPTQ problem with
    their rows stacked: rows are quantized independently given H, so the result is the same as
    solving them one by one, but the sequential column walk and the Cholesky run once (q/k/v and
    gate/up at k = 0, or with an activation-only metric).
    """
    H = stats.hessian if stats is not None else None
    problems = {}  # (bits, group size, salient columns) -> [(short, W, salient scores)]
    for short, module in modules.items():
        name = f"{prefix}.{short}"
        W = module.weight.detach().float()
        if not torch.isfinite(W).all():
            raise QRecoverError(f"the weights of {name} contain NaN or Inf; the model file is broken")
        spec = config.resolve(name, module.in_features)
        salient, chosen_scores = torch.empty(0, dtype=torch.long), []
        if spec.n_salient:
            scores = column_scores(W, stats.act_norm, config.metric_spec, spec.bits, generator)
            salient = select_salient(scores, spec.n_salient)
            chosen_scores = scores.cpu()[salient].tolist()
        key = (spec.bits, spec.group_size, tuple(salient.tolist()))
        problems.setdefault(key, []).append((short, W, chosen_scores))

    done = {}
    for (bits, group_size, salient), members in problems.items():
        start = time.perf_counter()
        result = gptq_quantize(
            torch.cat([W for _, W, _ in members]), H if config.method == "gptq" else None, bits=bits,
            group_size=group_size, salient_idx=torch.tensor(salient, dtype=torch.long), sym=config.sym,
            mse=config.mse_clip, desc_act=config.desc_act, damp=config.damp, group_aware=config.group_aware,
        )
        row = 0
        for short, W, chosen_scores in members:
            own = result.rows(row, row + W.shape[0])
            row += W.shape[0]
            qlinear = QuantLinear.from_result(own, modules[short].bias, salient_dtype, config.zero_offset)
            done[short] = qlinear, {
                "module": f"{prefix}.{short}",
                "bits": bits,
                "group_size": group_size,
                "salient": len(salient),
                "error": output_error(W, qlinear.dequantize(), H),
                "damp": result.damp,
                "seconds": round((time.perf_counter() - start) / len(members), 4),
                "solved_with": [f"{prefix}.{other}" for other, _, _ in members if other != short],
                "salient_idx": list(salient),
                "salient_scores": chosen_scores,
            }
    return done


def quantize_layer(layer, arch: Architecture, prefix: str, batches, kwargs, config: QuantConfig, generator, salient_dtype):
    """Quantize every linear of one decoder layer in place; returns (module reports, layer outputs).

    batches None (a config that needs no calibration): the weights alone are rounded, outputs None.
    """
    linears = {name: layer.get_submodule(name) for name in arch.linear_names}
    passes = LayerPasses(layer, batches, kwargs) if batches is not None else None
    ends_block = {last: (block, returns_tuple) for block, last, returns_tuple in arch.replayable}
    reports = []
    try:
        for group in arch.subgroups:
            keep = passes is not None and len(group) == 1 and group[0] in ends_block
            stats, inputs = (None, []) if passes is None else passes.observe(
                linears[group[0]], f"{prefix}.{group[0]}", config.metric_spec.rho, keep)
            solved = quantize_linears({short: linears[short] for short in group}, prefix, stats, config, generator, salient_dtype)
            for short in group:
                qlinear, report = solved[short]
                if passes is not None:
                    qlinear.hold_dense(True, batches[0].dtype)  # dequantized once for every later pass
                layer.set_submodule(short, qlinear)
                reports.append(report)
            if keep:
                block, returns_tuple = ends_block[group[0]]
                passes.replay_block(block, layer.get_submodule(group[0]), inputs, returns_tuple)
        return reports, passes.outputs() if passes is not None else None
    finally:
        hold_dense_weights(layer, False)


def _resume_settings(config: QuantConfig, samples: torch.Tensor | None) -> dict:
    calibration = None if samples is None else hashlib.sha256(samples.numpy().tobytes()).hexdigest()
    # The format of the saved layers' zero points: a work folder of an older qrecover (v1 only) is refused.
    return {"quantization": config.to_dict(), "checkpoint_format": config.checkpoint_format, "calibration": calibration}


class _Resume:
    """Per-layer progress in a work directory: finished layers' tensors and the next layer's inputs."""

    def __init__(self, work_dir, settings: dict):
        self.dir = Path(work_dir) if work_dir else None
        # Made at the first save, so a run refused before any layer is done leaves no folder behind.
        self.file = StateFile(self.dir and self.dir / "progress.json", settings, "an interrupted quantization")
        self.state = self.file.read() or {"done": 0, "layers": [], "seconds": 0.0}
        self.seconds_before = self.state["seconds"]  # work time of earlier, interrupted runs

    @property
    def done(self) -> int:
        return self.state["done"]

    def restore(self, layers, arch: Architecture, config: QuantConfig, device, inputs: bool):
        """Put the finished layers back as QuantLinears; returns the saved inputs of the next layer
        (None for a run without calibration, `inputs` False)."""
        for i in range(self.done):
            tensors = load_file(self.dir / f"layer{i:04d}.safetensors")
            for short in arch.linear_names:
                linear = layers[i].get_submodule(short)
                prefix = short + "."
                own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                bits = config.resolve(f"{arch.layers}.{i}.{short}", linear.in_features).bits
                layers[i].set_submodule(short, QuantLinear.from_tensors(own, bits, config.zero_offset))
        if not inputs:
            return None
        saved = load_file(self._inputs(self.done), device=str(device))
        return [saved[f"batch{j}"] for j in range(len(saved))]

    def _inputs(self, index: int) -> Path:
        # Named by layer: a kill between writing them and progress.json must not pair one layer's
        # progress with the next layer's inputs.
        return self.dir / f"inputs{index:04d}.safetensors"

    def save(self, index: int, layer, batches, reports, seconds, elapsed: float):
        if self.dir is None:
            return
        tensors = {f"{name}.{k}": v.contiguous().cpu() for name, m in layer.named_modules()
                   if isinstance(m, QuantLinear) for k, v in m.state_dict().items()}
        with disk_errors(self.dir, sum(t.nbytes for t in tensors.values()) + sum(b.nbytes for b in batches or [])):
            self.dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(self.dir / f"layer{index:04d}.safetensors"))
            if batches is not None:
                tmp = self.dir / "inputs.safetensors.tmp"
                save_file({f"batch{j}": b.contiguous().cpu() for j, b in enumerate(batches)}, str(tmp))
                tmp.replace(self._inputs(index + 1))
        self.state["layers"].append({"index": index, "seconds": seconds, "modules": reports})
        self.state["done"] = index + 1
        self.state["seconds"] = round(self.seconds_before + elapsed, 3)
        self.file.write(self.state)
        self._inputs(index).unlink(missing_ok=True)


def quantize_model(
    model,
    samples: torch.Tensor | None,
    config: QuantConfig,
    device=None,
    batch_size: int = 8,
    work_dir=None,
    salient_dtype=torch.float16,
    progress: bool = True,
) -> dict:
    """Quantize every decoder linear of `model` in place; returns the run report.

    `samples` (token ids, samples x seqlen) may be None only when the config needs no calibration.
    """
    if samples is None and config.needs_calibration:
        raise QRecoverError(
            "GPTQ and salient columns need calibration samples; pass token ids, or use method='rtn' with salient=0"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    home = torch.device("cpu") if device.type == "cuda" else device
    arch = architecture(model)
    layers = model.get_submodule(arch.layers)
    resume = _Resume(work_dir, _resume_settings(config, samples))
    start = time.perf_counter()
    resumed = resume.done
    if resumed:
        print(f"qrecover: resuming the interrupted quantization in {resume.dir}: {resume.done} of {len(layers)} "
              f"layers were done ({resume.seconds_before:.1f} s of work)", file=sys.stderr)
    batches = resume.restore(layers, arch, config, device, samples is not None) if resume.done else None
    kwargs = None
    if samples is not None and resume.done:
        _, kwargs = capture_inputs(model, samples[:1], device, 1)
    elif samples is not None:
        batches, kwargs = capture_inputs(model, samples, device, batch_size)
    bar = tqdm(range(len(layers)), desc="quantizing layers", initial=resume.done, disable=not progress)
    for i in range(resume.done, len(layers)):
        layer_start = time.perf_counter()
        layer = layers[i].to(device)
        generator = torch.Generator().manual_seed(config.seed + i)  # per layer, so a resumed run draws the same
        reports, batches = quantize_layer(layer, arch, f"{arch.layers}.{i}", batches, kwargs and kwargs[i], config, generator, salient_dtype)
        if batches is not None and not all(torch.isfinite(b.sum()) for b in batches):
            raise QRecoverError(f"the outputs of quantized layer {i} contain NaN or Inf; try --dtype float32")
        layers[i] = layer.to(home)
        seconds = round(time.perf_counter() - layer_start, 3)
        resume.save(i, layers[i], batches, reports, seconds, time.perf_counter() - start)
        if resume.dir is None:
            resume.state["layers"].append({"index": i, "seconds": seconds, "modules": reports})
        bar.update(1)
        bar.set_postfix(err=f"{sum(r['error'] for r in reports) / len(reports):.2e}")
    bar.close()
    return {
        "settings": config.to_dict(),
        "calibration": {"samples": samples.shape[0], "seqlen": samples.shape[1]} if samples is not None else None,
        "error": "output" if samples is not None else "weight",
        "device": str(device),
        "seconds": round(resume.seconds_before + time.perf_counter() - start, 2),  # every run's work
        "resumed": {"layers_done": resumed, "seconds_before": resume.seconds_before} if resumed else None,
        "peak_memory_mb": peak_memory_mb(device),
        "layers": resume.state["layers"],
    }
