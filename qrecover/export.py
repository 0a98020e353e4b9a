"""Export a checkpoint into formats other tools serve: a GPTQ base plus an exact LoRA adapter, a
dense model, or a GPTQ model with the salient columns rounded into its grid.

Format v1 stores the codes at salient positions as the zero point, so the low-bit part is an
ordinary GPTQ weight (written as GPTQ v1 for symmetric grids, v2 for asymmetric ones, in groups
every GPTQ kernel takes: as_served_gptq), and the 16-bit part `salient_weight @ x[salient_idx]` is exactly a LoRA of
rank k: A (r x in) holds a single 1 per row at a salient column, B (out x r) = salient_weight, both
padded with zeros to a rank r that vLLM serves, lora_alpha = r (scale 1).
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .config import check_choice
from .errors import QRecoverError
from .format import pack_codes, pack_zeros, unpack_codes
from .io import MAX_SHARD_BYTES, gptq_config, is_checkpoint, load_checkpoint, store_zeros_as, unique_tensors
from .nn import QuantLinear
from .outputs import atomic_dir, check_output
from .quant.grid import fit_grid, quantize

FORMATS = ("gptq-lora", "dense", "gptq")
# The LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def served_rank(k: int, name: str) -> int:
    """The smallest rank vLLM serves that holds k columns."""
    for rank in VLLM_LORA_RANKS:
        if rank >= k:
            return rank
    raise QRecoverError(
        f"{name} keeps {k} salient columns, more than the largest LoRA rank vLLM serves "
        f"({VLLM_LORA_RANKS[-1]}): export it --to dense, or quantize with fewer salient columns"
    )


def _quant_linears(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _trained_lora(adapter_dir: Path) -> tuple[Path, dict]:
    """(base checkpoint, {module: (A, B * scale)}) of a LoRA adapter that `recover --method lora` saved."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(adapter_dir)
    base = Path(config.base_model_name_or_path or "")
    if not is_checkpoint(base):
        raise QRecoverError(f"{adapter_dir}: its base {base} is not a qrecover checkpoint here; export that checkpoint instead")
    if config.use_dora or config.rank_pattern or config.alpha_pattern:
        raise QRecoverError(f"{adapter_dir}: only plain LoRA adapters (one rank, no DoRA) export; this one was not made by qrecover")
    scale = config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r)
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    parts = {}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        parts.setdefault(module, {})["A" if ".lora_A." in key else "B"] = value.float()
    return base, {m: (p["A"], p["B"] * scale) for m, p in parts.items()}


def _load(path) -> tuple:
    """(model with QuantLinears, tokenizer, QuantConfig, trained LoRA parts or {}) of a checkpoint or an
    adapter on one."""
    path = Path(path)
    lora = {}
    if (path / "adapter_config.json").is_file():
        path, lora = _trained_lora(path)
    model, tokenizer, config = load_checkpoint(path)
    return model, tokenizer, config, lora


def adapter_parts(model, lora: dict, dtype) -> tuple[dict, dict]:
    """({module: rank}, adapter tensors) of the salient columns (and a trained LoRA) as one exact LoRA."""
    ranks, tensors = {}, {}
    for name, q in _quant_linears(model).items():
        A_parts, B_parts = [], []
        if name in lora:
            A_parts.append(lora[name][0])
            B_parts.append(lora[name][1])
        if q.n_salient:
            onehot = torch.zeros(q.n_salient, q.in_features)
            onehot[torch.arange(q.n_salient), q.salient_idx.long()] = 1.0
            A_parts.append(onehot)
            B_parts.append(q.salient_weight.float())
        if not A_parts:
            continue
        A, B = torch.cat(A_parts), torch.cat(B_parts, dim=1)
        rank = served_rank(A.shape[0], name)
        pad = rank - A.shape[0]
        ranks[name] = rank
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([A, A.new_zeros(pad, A.shape[1])]).to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1).to(dtype).contiguous()
    return ranks, tensors


def _adapter_config(ranks: dict, modules: list[str], base: str):
    from peft import LoraConfig

    default = Counter(ranks.values()).most_common(1)[0][0]
    different = {name: r for name, r in ranks.items() if r != default}
    # Short names (q_proj, ...) when every quantized projection has an adapter, else the full names.
    targets = sorted({name.rsplit(".", 1)[-1] for name in ranks}) if set(ranks) == set(modules) else sorted(ranks)
    return LoraConfig(
        r=default, lora_alpha=default, target_modules=targets, rank_pattern=different, alpha_pattern=different,
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base,
    )


def round_salient_into_grid(q: QuantLinear, sym: bool) -> None:
    """Drop the salient columns into the low-bit part (lossy: `--to gptq`).

    Salient columns hold the weights that are large against their group's range, so their groups
    are fitted again per row (MSE clip) on the full weight and rounded to nearest; other groups
    keep their GPTQ codes."""
    if not q.n_salient:
        return
    maxq = 2**q.bits - 1
    weight = q.dequantize(torch.float32)  # [out, in], the salient columns included
    codes = unpack_codes(q.qweight, q.bits, q.in_features)  # [in, out]
    zeros = q.zeros()  # [groups, out]
    g_idx = q.g_idx.long()
    for group in g_idx[q.salient_idx.long()].unique().tolist():
        cols = torch.nonzero(g_idx == group).flatten()
        scale, zero = fit_grid(weight[:, cols], q.bits, sym, mse=True)  # [out, 1] each
        codes[cols] = quantize(weight[:, cols], scale, zero, maxq).t().long()
        q.scales[group] = scale.squeeze(1).half()
        zeros[group] = zero.squeeze(1).long()
    q.qweight.copy_(pack_codes(codes, q.bits))
    q.set_zeros(zeros)
    q.salient_idx = torch.zeros(0, dtype=torch.int32)
    q.salient_weight = nn.Parameter(q.salient_weight.new_zeros(q.out_features, 0), requires_grad=False)


def served_group_size(layers, group_size: int) -> int:
    """The group size a GPTQ base is written with: the checkpoint's, or where some layer's input size
    is not a multiple of it (SmolLM2's 576 at g128: a partial last group), its largest divisor that
    divides every input size (64 there). GPTQ kernels (GPTQModel's, vLLM's, Marlin, ExLlama) refuse
    a partial group; the smaller groups repeat their parent's scale and zero point: the same weights,
    with the repeated scales and zeros on disk."""
    if group_size == -1 or all(q.in_features % group_size == 0 for q in layers):
        return group_size
    return math.gcd(group_size, *(q.in_features for q in layers))


def split_groups(q: QuantLinear, group_size: int, served: int) -> None:
    """Store q's groups of group_size (g_idx = k // group_size) as groups of served, a divisor of it."""
    K = q.in_features
    if served == group_size:
        return
    if not torch.equal(q.g_idx.long(), torch.arange(K) // group_size):
        raise QRecoverError(
            f"a layer with {K} inputs has act-order groups (--desc-act) with a partial group, which GPTQ "
            f"kernels refuse: export it --to dense, or quantize with a group size that divides {K}"
        )
    parent = torch.arange(math.ceil(K / served)) * served // group_size
    q.qzeros = pack_zeros(q.zeros()[parent], q.bits, q.zero_offset)
    q.scales = q.scales[parent].contiguous()
    q.g_idx.copy_(torch.arange(K) // served)


def _base_tensors(model, dtype) -> dict:
    """The GPTQ tensors of every quantized layer and the model's other tensors in dtype."""
    out = {}
    for name, t in unique_tensors(model).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("salient_idx", "salient_weight"):
            continue
        out[name] = t.to(dtype) if t.is_floating_point() and leaf != "scales" else t
    return out


def as_served_gptq(model, config) -> int:
    """Lay every quantized layer out as the GPTQ base stores it: zero points in the grid's format
    (v1 for symmetric grids, v2 for asymmetric ones), groups every GPTQ kernel takes; returns
    that group size. The layers compute the same."""
    store_zeros_as(model, config)
    layers = list(_quant_linears(model).values())
    group_size = served_group_size(layers, config.group_size)
    for q in layers:
        split_groups(q, config.group_size, group_size)
    return group_size


def _write_base(model, tokenizer, config, group_size: int, dtype, where: Path) -> None:
    where.mkdir(exist_ok=True)
    model.save_pretrained(where, max_shard_size=MAX_SHARD_BYTES, state_dict=_base_tensors(model, dtype))
    hf_config = copy.deepcopy(model.config)
    hf_config.quantization_config = gptq_config(config, group_size)
    hf_config.dtype = dtype
    hf_config.save_pretrained(where)
    (where / "quantize_config.json").write_text(json.dumps(gptq_config(config, group_size), indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(where)
    tokenizer.save_pretrained(where)


def _dense(model, lora: dict, dtype):
    """An ordinary model: every QuantLinear replaced by an nn.Linear of its full weight (LoRA merged)."""
    for name, q in _quant_linears(model).items():
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        weight = q.dequantize(torch.float32)
        if name in lora:
            A, B = lora[name]
            weight += B @ A
        linear.weight.data = weight
        if q.bias is not None:
            linear.bias.data = q.bias.float()
        model.set_submodule(name, linear)
    del model.config.quantization_config
    return model.to(dtype)


def export(checkpoint, out, to: str = "gptq-lora", dtype=torch.float16, overwrite: bool = False,
           eval_dataset: str | None = "wikitext2", eval_windows: int = 4, progress: bool = True) -> dict:
    """Export a checkpoint (or a LoRA recovery on one) to `out`; returns what was written.

    gptq-lora: out/base (GPTQ, transformers and GPTQModel load it) + out/adapter (PEFT LoRA);
    dense: an ordinary model; gptq: the base alone, the salient columns rounded into its grid, with
    the perplexity that costs on eval_dataset (its first eval_windows windows)."""
    check_choice(to, FORMATS, "--to")
    if dtype not in (torch.float16, torch.bfloat16):
        raise QRecoverError(f"exports hold 16-bit weights: --dtype float16 or bfloat16, not {dtype}")
    target = check_output(out, [checkpoint], overwrite)
    model, tokenizer, config, lora = _load(checkpoint)
    if to != "dense" and any(key in ("bits", "group_size") for values in config.overrides.values() for key in values):
        raise QRecoverError(
            "per-module bit widths or group sizes (--override) cannot be described by one GPTQ config: "
            "export it --to dense"
        )
    result = {"out": str(target), "to": to, "dtype": str(dtype).removeprefix("torch.")}

    if to == "dense":
        dense = _dense(model, lora, dtype)
        atomic_dir(target, lambda tmp: (dense.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), overwrite, kind="dense export")
        return result

    if to == "gptq":
        if lora:
            raise QRecoverError("a LoRA recovery cannot be rounded into the GPTQ grid: export it --to gptq-lora or --to dense")
        cost = {}
        tokens = None
        if eval_dataset:
            from .data import eval_tokens
            from .eval.perplexity import perplexity

            tokens = eval_tokens(tokenizer, eval_dataset)
            cost["before"] = perplexity(model, tokens, max_windows=eval_windows, progress=progress)["perplexity"]
        rounded = sum(q.n_salient for q in _quant_linears(model).values())
        for q in _quant_linears(model).values():
            round_salient_into_grid(q, config.sym)
        if tokens is not None:
            cost["after"] = perplexity(model, tokens, max_windows=eval_windows, progress=progress)["perplexity"]
            result["perplexity"] = {"dataset": eval_dataset, "windows": eval_windows, **cost}
        result["rounded_columns"] = rounded
        result["group_size"] = group_size = as_served_gptq(model, config)
        atomic_dir(target, lambda tmp: _write_base(model, tokenizer, config, group_size, dtype, tmp), overwrite, kind="gptq export")
        return result

    ranks, tensors = adapter_parts(model, lora, dtype)
    result["ranks"] = dict(Counter(ranks.values()))
    result["group_size"] = group_size = as_served_gptq(model, config)

    def build(tmp: Path):
        _write_base(model, tokenizer, config, group_size, dtype, tmp / "base")
        if not tensors:
            return  # k = 0 and no trained adapter: the base is the whole model
        from safetensors.torch import save_file

        adapter = tmp / "adapter"
        _adapter_config(ranks, list(_quant_linears(model)), str(target / "base")).save_pretrained(adapter)
        save_file(tensors, str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    atomic_dir(target, build, overwrite, kind="gptq-lora export")
    return result
