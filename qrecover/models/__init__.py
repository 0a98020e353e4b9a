"""Loading causal LMs to quantize, and finding their linears.

Two ways in: a model small enough for memory loads whole (pretrained.py: HF directory, hub id, GGUF
file, packaged alias); a directory of sharded safetensors (the usual layout from 7B up) is read one
decoder layer at a time (shards.py). `load_for_quantization` chooses; architectures.py says where each
family keeps its layers and projections.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import QRecoverError
from .architectures import ARCHITECTURES, Architecture, architecture, quantizable_linears
from .packaged import PACKAGED, cache_dir, convert_gguf, packaged_model_dir
from .pretrained import load_pretrained, read_config, refuse_partial_load, resolve_model
from .shards import Shards, empty_model, is_sharded

LOADING = ("auto", "whole", "stream")

__all__ = [
    "ARCHITECTURES", "Architecture", "LOADING", "PACKAGED", "Shards", "architecture", "cache_dir", "convert_gguf",
    "load_for_quantization", "load_pretrained", "packaged_model_dir", "quantizable_linears", "read_config",
    "reference_model_dir", "refuse_partial_load", "resolve_model",
]


def reference_model_dir() -> Path:
    """SmolLM2-135M-Instruct, the reference model of docs/BENCHMARKS.md, as a safetensors directory."""
    return packaged_model_dir("smollm2-135m")


def load_for_quantization(spec: str, dtype="auto", loading: str = "auto"):
    """(model, tokenizer, shards): the whole model and None, or (streaming) the model on the meta
    device and the Shards its decoder layers are read from one at a time.

    loading "auto" streams a directory of sharded safetensors (model.safetensors.index.json) and loads
    anything else whole; "stream" streams any safetensors directory; "whole" never streams."""
    from transformers import AutoTokenizer

    where, gguf = resolve_model(spec)
    local = Path(where).is_dir()
    stream = loading == "stream" or (loading == "auto" and local and is_sharded(where))
    if not stream:
        return (*load_pretrained(spec, dtype=dtype), None)
    if gguf or not local:
        raise QRecoverError(
            f"{spec} cannot be streamed: streaming reads a local directory of safetensors files; "
            "download the model into a folder first, or load it whole (--loading whole)"
        )
    shards = Shards(where)
    model = empty_model(where, dtype)
    architecture(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise QRecoverError(f"could not load the tokenizer of {spec!r}: {e}") from e
    return model, tokenizer, shards
