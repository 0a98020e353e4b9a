"""Loading an ordinary (unquantized) causal LM whole: a Hugging Face directory, a hub id, a GGUF file
or a packaged model's alias, through transformers' from_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import QRecoverError
from .architectures import architecture
from .packaged import ALIASES, packaged_model_dir


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for a model spec."""
    spec = str(spec)
    if spec.lower() in ALIASES:
        return str(packaged_model_dir(spec)), None
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
            f"(owner/name) or one of {', '.join(ALIASES)}"
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


