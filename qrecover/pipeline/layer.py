"""One decoder layer quantized in place, on calibration inputs captured at the first layer.

Within a layer the linears are quantized in sub-groups (q/k/v, o, gate/up, down), each seeing inputs
computed by the already-quantized ones (true sequential): a forward pass stops as soon as the next
sub-group's input has been observed. The quantized layer then maps its inputs to the next layer's.
Activations live in an Activations set (activations.py): in memory, or on disk past the budget.
"""
from __future__ import annotations

import time

import torch

from ..config import QuantConfig
from ..errors import QRecoverError
from ..models import Architecture, architecture
from ..nn import QuantLinear, hold_dense_weights
from ..observer import InputStats
from ..quant.gptq import gptq_quantize, output_error
from ..saliency import column_scores, select_salient
from ..utils import return_freed_memory
from .activations import Activations


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

    def __init__(self, layer, batches: Activations, kwargs):
        self.layer, self.batches, self.kwargs = layer, batches, kwargs
        self.replays = {}  # block name -> (outputs per batch, returns a tuple)

    def _new(self) -> Activations:
        return Activations(self.batches.budget, self.batches.device)

    def observe(self, module, name: str, rho: float, keep_inputs: bool = False):
        """(input statistics, inputs per batch if kept) of one linear of the layer; passes stop there."""
        stats = InputStats(module.in_features, rho, hessian=True, device=self.batches.device, name=name)
        inputs = self._new()

        def hook(mod, args):
            stats.add(args[0])
            if keep_inputs:
                inputs.append(args[0])
            raise _InputSeen

        self._run(module.register_forward_pre_hook(hook))
        stats.check_finite()
        return stats, inputs

    def replay_block(self, block: str, last, inputs: Activations, returns_tuple: bool) -> None:
        outs = self._new()
        with torch.no_grad():
            for x in inputs:
                outs.append(last(x))
        inputs.release()
        self.replays[block] = (outs, returns_tuple)

    def outputs(self) -> Activations:
        """The layer's outputs, one tensor per batch."""
        outs = self._run(None)
        for replayed, _ in self.replays.values():
            replayed.release()
        return outs

    def _run(self, handle) -> Activations:
        for block, (outs, returns_tuple) in self.replays.items():
            replayed = iter(outs)
            module = self.layer.get_submodule(block)
            if returns_tuple:
                module.forward = lambda *a, _it=replayed, **k: (next(_it), None)
            else:
                module.forward = lambda *a, _it=replayed, **k: next(_it)
        outs = self._new()
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
                "error": output_error(W, qlinear.dequantize() if own.walked_error is None else None, H,
                                      None if own.walked_error is None else own.walked_error.sum(), own.damp_added),
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
            stats, inputs = (None, None) if passes is None else passes.observe(
                linears[group[0]], f"{prefix}.{group[0]}", config.metric_spec.rho, keep)
            # Taken out of `linears`, so each original weight is freed as soon as its QuantLinear replaces it.
            solved = quantize_linears({short: linears.pop(short) for short in group}, prefix, stats, config, generator, salient_dtype)
            del stats
            return_freed_memory()  # the solver's temporaries: without it the heap keeps them (utils)
            for short in group:
                qlinear, report = solved[short]
                if passes is not None:
                    qlinear.hold_dense(True, batches.dtype)  # dequantized once for every later pass
                layer.set_submodule(short, qlinear)
                reports.append(report)
            if keep:
                block, returns_tuple = ends_block[group[0]]
                passes.replay_block(block, layer.get_submodule(group[0]), inputs, returns_tuple)
                hold_dense_weights(layer.get_submodule(block), False)  # a replayed block is not computed again
        return reports, passes.outputs() if passes is not None else None
    finally:
        hold_dense_weights(layer, False)
