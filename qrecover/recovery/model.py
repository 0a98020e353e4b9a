"""The model-level driver of recovery: put trainable layers in, take them out, merge.

Methods:
- gift:  train only the 16-bit salient columns (RecoveryLayer); the frozen rest computes as it is
         (noise "none", the default) or with GIFT-SW's quantization noise (noise "gaussian"); with
         scale_lr > 0 the quantization scales train too;
- lora:  LoRA adapters (peft) on every projection, quantized weights and salient columns frozen;
- full:  full fine-tuning (unquantized models only).

A qrecover checkpoint is recovered in place of its salient columns. An ordinary model first gets
SalientLinears, columns picked by the metric on a few training batches; after training they are
merged back into nn.Linear.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..config import salient_count
from ..errors import QRecoverError
from ..models import architecture, quantizable_linears
from ..nn import QuantLinear
from ..observer import InputStats
from ..saliency import column_scores, resolve_metric, select_salient
from .config import RecoverConfig
from .data import collate
from .layer import SALIENT_LAYERS, RecoveryLayer, SalientLinear
from .noise import NoiseClock, NoiseConfig


def salient_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SALIENT_LAYERS)]


def is_quantized(model) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def add_salient_columns(model, examples, config: RecoverConfig, pad_id: int) -> None:
    """Replace the projections of an ordinary model by SalientLinears, columns picked by the metric."""
    metric = resolve_metric(config.metric)
    linears = quantizable_linears(model)
    stats = {name: InputStats(m.in_features, metric.rho, hessian=False, device=m.weight.device, name=name) for name, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.add(args[0])) for n, m in linears.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(min(config.saliency_batches, len(examples.items))):
                batch = collate([examples.items[i]], pad_id)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for h in hooks:
            h.remove()
    generator = torch.Generator().manual_seed(config.train.seed)
    step_bits = config.noise_bits or 4
    for name, linear in linears.items():
        stats[name].check_finite()
        k = salient_count(config.salient, linear.in_features, name)
        scores = column_scores(linear.weight.detach().float(), stats[name].act_norm, metric, step_bits, generator)
        model.set_submodule(name, SalientLinear(linear, select_salient(scores, k), step_bits))


def start(model, config: RecoverConfig, clock: NoiseClock, noise_scale: float | None = None) -> int:
    """Freeze everything, make the method's parameters trainable; returns their number.

    gift: every salient layer is wrapped in a RecoveryLayer (noise_scale overrides config's)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "full":
        if is_quantized(model):
            raise QRecoverError("full fine-tuning needs an unquantized model; this one is a quantized checkpoint")
        for p in model.parameters():
            p.requires_grad_(True)
    elif config.method == "gift":
        modules = salient_modules(model)
        train_scales = config.train.scale_lr > 0
        if train_scales and not is_quantized(model):
            raise QRecoverError("--scale-lr trains the quantization scales of a qrecover checkpoint; this model is not quantized")
        if not modules or (sum(m.n_salient for m in modules) == 0 and not train_scales):
            raise QRecoverError("the model has no salient columns: nothing to train (quantize with --salient > 0, or train the scales: --scale-lr)")
        scale = config.noise_scale if noise_scale is None else noise_scale
        noise = NoiseConfig(config.noise, scale, config.noise_bits)
        names = {m: n for n, m in model.named_modules()}
        for i, m in enumerate(modules):
            model.set_submodule(names[m], RecoveryLayer(m, noise, clock, i, train_scales))
        if config.train_norms:
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def salient_params(model, config: RecoverConfig) -> int:
    """Parameters in the salient columns: those of a quantized model, or those config picks."""
    total = 0
    for name, m in quantizable_linears(model).items():
        k = m.n_salient if isinstance(m, (*SALIENT_LAYERS, RecoveryLayer)) else salient_count(config.salient, m.in_features, name)
        total += k * m.out_features
    return total


def lora_rank_for(model, n_params: int) -> int:
    """The LoRA rank on all projections with about n_params parameters."""
    per_rank = sum(m.in_features + m.out_features for m in quantizable_linears(model).values())
    return max(1, round(n_params / per_rank))


def add_lora(model, rank: int):
    """peft LoRA adapters on every projection (QuantLinears included); the base stays frozen."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.gptq import GPTQLoraLinear

    class QuantLoraLinear(GPTQLoraLinear):
        """peft's wrapper for unmergeable quantized layers: output of the layer plus the adapter's."""

        def _get_in_out_features(self, base_layer):
            return base_layer.in_features, base_layer.out_features

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[n.split(".")[-1] for n in architecture(model).linear_names])
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    try:
        return get_peft_model(model, config)
    except ImportError as e:  # peft refuses every layer when gptqmodel is installed without optimum
        raise QRecoverError(f"peft could not add LoRA adapters ({e}); install what it names, e.g. pip install 'optimum>=1.24'") from e


def load_lora(adapter_dir):
    """(model, tokenizer) of a LoRA adapter saved on top of a qrecover checkpoint (peft format)."""
    import json
    from pathlib import Path

    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..io import load_checkpoint

    adapter_dir = Path(adapter_dir)
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = settings.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise QRecoverError(f"{adapter_dir}: its base checkpoint {base!r} is not a directory here")
    model, tokenizer, _ = load_checkpoint(base)
    model = add_lora(model, settings["r"])
    set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"))
    return model.eval(), tokenizer


def merge_salient(model) -> None:
    """Turn SalientLinears back into nn.Linear with the trained columns written in."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SalientLinear):
            model.set_submodule(name, module.merged())


def finish(model) -> None:
    """Take every RecoveryLayer out, leaving its base layer with the trained columns."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RecoveryLayer):
            model.set_submodule(name, module.finish())


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor, by name: what a noise pilot restores afterwards."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict[str, torch.Tensor], noise_scale: float) -> None:
    """Put the trainable tensors back to `state` and set every RecoveryLayer's noise scale."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    for m in model.modules():
        if isinstance(m, RecoveryLayer):
            m.noise = NoiseConfig(m.noise.kind, noise_scale, m.noise.bits)


def recovery_summary(config: RecoverConfig, examples, trainable: int, seconds: float) -> dict:
    return {
        **config.to_dict(), "examples": len(examples.items), "example_kind": examples.kind,
        "truncated": examples.truncated, "dropped": examples.dropped, "trainable_params": trainable,
        "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
