"""Where each supported decoder family keeps its layers and projections: one table, ARCHITECTURES,
keyed by the config's model_type; everything that walks a model's linears asks it."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import QRecoverError


@dataclass(frozen=True)
class Architecture:
    """Where one decoder family keeps its parts, as module paths (layers' from the model, the rest
    from a decoder layer)."""

    # A layer's linears in the order their inputs become available; the members of a group read
    # the same input, so one set of input statistics serves the whole group.
    subgroups: tuple[tuple[str, ...], ...]
    layers: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    # Blocks whose output is their last linear's output, so once that linear is quantized the
    # block's outputs follow from its recorded inputs: (block, last linear, whether the block
    # returns (output, attention weights) as HF attention modules do).
    replayable: tuple[tuple[str, str, bool], ...] = (
        ("self_attn", "self_attn.o_proj", True), ("mlp", "mlp.down_proj", False))

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.subgroups for name in group)


_LLAMA_LAYOUT = Architecture(subgroups=(
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
))
# Phi-3 fuses q/k/v into one projection and gate/up into another.
_PHI3_LAYOUT = Architecture(subgroups=(
    ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)))

ARCHITECTURES = {
    "llama": _LLAMA_LAYOUT,  # SmolLM too
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,  # Qwen2 and Qwen2.5
    "qwen3": _LLAMA_LAYOUT,
    "gemma": _LLAMA_LAYOUT,
    "gemma2": _LLAMA_LAYOUT,
    "gemma3_text": _LLAMA_LAYOUT,  # Gemma3ForCausalLM (the text-only checkpoints)
    "phi3": _PHI3_LAYOUT,
}
# transformers 5 stores the routed experts of these as fused 3-D parameters, not nn.Linear.
_FUSED_EXPERTS = ("mixtral", "qwen2_moe", "qwen3_moe")


def architecture(model: nn.Module) -> Architecture:
    """The table entry of a model, checked against its modules."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    arch = ARCHITECTURES.get(kind)
    if arch is None:
        why = (" (its experts are fused 3-D tensors in transformers 5, which qrecover does not quantize yet)"
               if kind in _FUSED_EXPERTS else "")
        raise QRecoverError(
            f"unsupported architecture {kind!r} ({type(model).__name__}){why}: qrecover quantizes "
            f"{', '.join(ARCHITECTURES)} decoders"
        )
    layers = _submodule(model, arch.layers)
    missing = [name for name in (arch.embeddings, arch.final_norm) if _submodule(model, name) is None]
    if isinstance(layers, nn.ModuleList) and len(layers):
        missing += [f"{arch.layers}.{i}.{name}" for i, layer in enumerate(layers)
                    for name in arch.linear_names if _submodule(layer, name) is None]
    else:
        missing.append(arch.layers)
    if missing:
        raise QRecoverError(
            f"this {kind} model ({type(model).__name__}) lacks {', '.join(missing[:3])}: it is not laid out "
            f"as transformers' {kind} models are; load it with transformers' own {kind} classes"
        )
    return arch


def _submodule(root: nn.Module, name: str):
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def quantizable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantizable linear of the decoder layers, by its full name, in layer order."""
    arch = architecture(model)
    return {f"{arch.layers}.{i}.{name}": layer.get_submodule(name)
            for i, layer in enumerate(model.get_submodule(arch.layers)) for name in arch.linear_names}
