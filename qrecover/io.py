"""Checkpoint format v1 (docs/FORMAT.md): a Hugging Face directory with safetensors, written atomically.

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
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from ._version import __version__
from .config import QuantConfig
from .errors import QRecoverError
from .format import ZERO_OFFSETS
from .models import architecture, quantizable_linears, read_config, refuse_partial_load
from .models.shards import INDEX, read_header
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


def _write_metadata(tmp: Path, hf_config, tokenizer, config: QuantConfig, recovery, source, plain_gptq: bool, report, extras) -> None:
    """Everything of a checkpoint but its tensors: config.json with the quantization_config, the
    tokenizer, quantize_config.json when every layer is plain GPTQ, the report, extras(tmp)."""
    cfg = copy.deepcopy(hf_config)
    cfg.quantization_config = quantization_config(config, recovery, source)
    cfg.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if plain_gptq and not config.overrides:
        atomic_write_json(tmp / "quantize_config.json", gptq_config(config))
    if report is not None:
        atomic_write_json(tmp / REPORT, report)
    if extras is not None:
        extras(tmp)


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
        # too. config.json is written again by _write_metadata, with the quantization_config.
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
        plain = bool(quantized) and all(m.n_salient == 0 for m in quantized)
        _write_metadata(tmp, model.config, tokenizer, config, recovery, source, plain, report, extras)

    return atomic_dir(out_dir, build, overwrite, needed_bytes=needed)


def shard_name(index: int, count: int) -> str:
    """transformers' name of shard `index` (from 1) of `count`."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space, and the work folder keeps its file until the checkpoint is in place.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_streamed_checkpoint(model, tokenizer, out_dir, config: QuantConfig, shards, layer_files: list[Path],
                             report: dict | None = None, overwrite: bool = False, source: str | None = None) -> Path:
    """Write checkpoint format v1 from a streamed quantization (pipeline.quantize_model with shards):
    each finished layer's file in the work folder becomes a shard, and each of the model's other
    tensors (the embeddings, the final norm, an untied head), read from the source shards one at a
    time in the dtype the model was quantized in, one more; model.safetensors.index.json maps them.
    The same tensors, bit for bit, as save_checkpoint writes for the model quantized whole."""
    from safetensors.torch import save_file

    layers_prefix = architecture(model).layers + "."
    tied = set(getattr(model, "all_tied_weights_keys", {}))  # copies of another tensor (a tied head): stored once
    rest = {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()
            if not name.startswith(layers_prefix) and name not in tied}
    count = len(layer_files) + len(rest)
    needed = sum(f.stat().st_size for f in layer_files) + sum(
        torch.Size(shards.headers[name][1]).numel() * dtype.itemsize for name, dtype in rest.items())

    def build(tmp: Path):
        weight_map, total = {}, 0
        for i, file in enumerate(layer_files):
            _link_or_copy(file, tmp / shard_name(i + 1, count))
        for j, (name, dtype) in enumerate(rest.items(), len(layer_files) + 1):
            save_file({name: shards.read([name])[name].to(dtype).contiguous()}, str(tmp / shard_name(j, count)), metadata={"format": "pt"})
        for j in range(1, count + 1):
            for key, (shape, dtype) in read_header(tmp / shard_name(j, count)).items():
                weight_map[key] = shard_name(j, count)
                total += torch.Size(shape).numel() * dtype.itemsize
        atomic_write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        generation = _generation_config(shards.folder, model)
        if generation is not None:
            generation.save_pretrained(tmp)
        plain = all(m["salient"] == 0 for layer in (report or {}).get("layers", []) for m in layer["modules"])
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        _write_metadata(tmp, model.config, tokenizer, config, None, source, plain, report, None)

    return atomic_dir(out_dir, build, overwrite, needed_bytes=needed)


def _generation_config(folder: Path, model):
    """The generation config from_pretrained would give the model of `folder` (transformers'
    adjust_generation_fn: generation_config.json, else one made from config.json)."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return None
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


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
