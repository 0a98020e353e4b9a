"""Checkpoint format v1 (DESIGN.md): a Hugging Face directory with safetensors, written atomically.

The tensors go through transformers' save_pretrained (sharded past max_shard_bytes) and come back
through from_pretrained and qrecover's quantizer (hf_quantizer), which puts a QuantLinear wherever
the checkpoint holds packed tensors. What is qrecover's own: the quantization_config entry, the
checks that refuse foreign, truncated or future-version checkpoints with a message saying why, and
the atomic write (a hidden temporary directory beside the target, renamed into place, so an
interrupted save never leaves a directory that looks like a checkpoint).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from ._version import __version__
from .config import QuantConfig
from .errors import QRecoverError
from .format import ZERO_OFFSETS
from .models import quantizable_linears, read_config, refuse_partial_load
from .nn import QuantLinear
from .outputs import atomic_dir
from .utils import atomic_write_json

FORMAT_VERSION = 1
REPORT = "quantization_report.json"
MAX_SHARD_BYTES = 4 * 2**30


# QuantConfig fields stored in quantization_config under their own names (the salient ones are nested).
_REQUIRED = ("bits", "group_size", "sym", "desc_act")  # in every checkpoint
_OPTIONAL = ("method", "group_aware", "mse_clip", "damp", "seed", "overrides")  # older checkpoints may lack these


def quantization_config(config: QuantConfig, recovery: dict | None = None, source: str | None = None) -> dict:
    """The `quantization_config` entry of config.json; source: the model it was quantized from."""
    metric = config.metric_spec
    salient = {("fraction" if isinstance(config.salient, float) else "count"): config.salient, "metric": config.metric,
               "tau": _num(metric.tau), "rho": _num(metric.rho), "gamma": metric.gamma}
    qc = {"quant_method": "qrecover", "format_version": FORMAT_VERSION, "checkpoint_format": config.checkpoint_format,
          **{k: getattr(config, k) for k in (*_REQUIRED, *_OPTIONAL)}, "salient": salient, "qrecover_version": __version__}
    if source:
        qc["source_model"] = source
    if recovery:
        qc["recovery"] = recovery
    return qc


def checkpoint_source(path) -> str | None:
    """The model a checkpoint was quantized from: recorded in its config, or (older checkpoints)
    in its quantization report."""
    qc = read_config(path).get("quantization_config") or {}
    if qc.get("source_model"):
        return qc["source_model"]
    report = Path(path) / REPORT
    return json.loads(report.read_text()).get("model") if report.is_file() else None


def config_from_checkpoint(qc: dict) -> QuantConfig:
    salient = qc.get("salient", {})
    defaults = QuantConfig(metric=salient.get("metric", "gift"))
    values = {k: qc[k] for k in _REQUIRED} | {k: qc.get(k, getattr(defaults, k)) for k in _OPTIONAL}
    values.update(salient=salient.get("count", salient.get("fraction", 0)), metric=defaults.metric)
    # Only norms that differ from the preset were overrides.
    for key in ("tau", "rho", "gamma"):
        value = float(salient.get(key, getattr(defaults.metric_spec, key)))
        if value != getattr(defaults.metric_spec, key):
            values[key] = value
    return QuantConfig(**values)


def _num(x: float):
    return "inf" if x == float("inf") else x


def unique_tensors(model) -> dict:
    """The state dict without tied duplicates (e.g. lm_head.weight = embed_tokens.weight)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def gptq_config(config: QuantConfig, group_size: int | None = None) -> dict:
    """The GPTQ description of a grid (quantize_config.json, and config.json's quantization_config
    of an export, which may store it in smaller groups); a checkpoint gets quantize_config.json only
    when no layer keeps 16-bit columns."""
    return {
        "bits": config.bits, "group_size": group_size or config.group_size, "desc_act": config.desc_act,
        "sym": config.sym, "quant_method": "gptq", "checkpoint_format": config.checkpoint_format,
        "damp_percent": config.damp, "true_sequential": True,
    }


def store_zeros_as(model, config: QuantConfig) -> None:
    """Store every layer's zero points in the GPTQ format of config's grid (lossless: v1 <-> v2),
    e.g. a layer loaded from an older asymmetric checkpoint, written in v1."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.zero_offset != config.zero_offset:
            m.set_zeros(m.zeros(), config.zero_offset)


def save_checkpoint(
    model, tokenizer, out_dir, config: QuantConfig, report: dict | None = None,
    recovery: dict | None = None, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES, extras=None,
    source: str | None = None,
) -> Path:
    """Write a quantized model as checkpoint format v1; extras(dir) may add files. Returns the directory."""

    store_zeros_as(model, config)
    needed = sum(t.nbytes for t in unique_tensors(model).values())

    def build(tmp: Path):
        # model.safetensors, or shards with their index; tied duplicates once; generation_config.json
        # too. config.json is written again below, with the quantization_config.
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        cfg = copy.deepcopy(model.config)
        cfg.quantization_config = quantization_config(config, recovery, source)
        cfg.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
        if quantized and all(m.n_salient == 0 for m in quantized) and not config.overrides:
            atomic_write_json(tmp / "quantize_config.json", gptq_config(config))
        if report is not None:
            atomic_write_json(tmp / REPORT, report)
        if extras is not None:
            extras(tmp)

    return atomic_dir(out_dir, build, overwrite, needed_bytes=needed)


def is_checkpoint(path) -> bool:
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    qc = read_config(path).get("quantization_config") or {}
    return qc.get("quant_method") == "qrecover"


def check_quantization_config(qc: dict | None, path) -> None:
    """Refuse a config.json quantization_config that is not qrecover's checkpoint format v1."""
    if not qc or qc.get("quant_method") != "qrecover":
        found = (qc or {}).get("quant_method", "none")
        raise QRecoverError(f"{path} is not a qrecover checkpoint (quant_method: {found})")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise QRecoverError(
            f"{path} uses checkpoint format version {version}; this qrecover ({__version__}) reads "
            f"version {FORMAT_VERSION}: upgrade qrecover"
        )
    stored = qc.get("checkpoint_format")
    if stored not in ZERO_OFFSETS:
        raise QRecoverError(
            f"{path}: quantization_config's checkpoint_format is {stored!r}, not one of {', '.join(ZERO_OFFSETS)}: "
            "restore config.json as qrecover wrote it"
        )


def zero_offset(qc: dict) -> int:
    """What the checkpoint's qzeros subtract from the zero points (checked by check_quantization_config)."""
    return ZERO_OFFSETS[qc["checkpoint_format"]]


def install_quant_linears(model, tensors: dict, config: QuantConfig, zero_offset: int, path) -> list[str]:
    """Replace every quantizable linear of model by a QuantLinear built from its checkpoint tensors.

    Takes the layers' tensors out of `tensors` (the rest belongs to the other modules) and returns
    the module prefixes it replaced. Tensors on the meta device give empty layers of the right
    shapes and dtypes, checked the same way, for a loader that fills them in afterwards.
    """
    quantized = []
    for name, linear in quantizable_linears(model).items():
        quantized.append(name + ".")
        own = {k[len(name) + 1 :]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
        try:
            q = QuantLinear.from_tensors(own, config.resolve(name, linear.in_features).bits, zero_offset)
        except QRecoverError as e:
            raise QRecoverError(f"{path}: {name}: {e}; the checkpoint is truncated or not a qrecover one") from e
        if (q.in_features, q.out_features) != (linear.in_features, linear.out_features):
            raise QRecoverError(
                f"{path}: {name} holds a {q.in_features}->{q.out_features} layer, the config says "
                f"{linear.in_features}->{linear.out_features}"
            )
        model.set_submodule(name, q)
    return quantized


def load_checkpoint(path, device="cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, QuantConfig) of a checkpoint format v1 directory, through transformers'
    from_pretrained and qrecover's quantizer (hf_quantizer); dtype: that of the tensors outside the
    quantized linears (default: as stored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise QRecoverError(f"checkpoint {path} does not exist")
    if not (path / "config.json").is_file():
        raise QRecoverError(f"{path} has no config.json: not a checkpoint")
    qc = read_config(path).get("quantization_config")
    check_quantization_config(qc, path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise QRecoverError(f"{path} could not be loaded ({e}); the checkpoint is corrupted or truncated: re-export it") from e
    refuse_partial_load(info, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer, config_from_checkpoint(qc)
