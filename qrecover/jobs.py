"""The jobs behind the CLI, callable from Python: quantize, recover, evaluate."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import QuantConfig
from .data import calibration_samples, eval_tokens, source_label
from .errors import QRecoverError
from .eval.perplexity import perplexity
from .io import REPORT, is_checkpoint, load, load_checkpoint, save_checkpoint
from .models import load_pretrained
from .nn import hold_dense_weights
from .noise import NoiseClock
from .pipeline import quantize_model
from .recover import (
    RecoverConfig, add_lora, add_salient_columns, finish_gift, is_quantized, lora_rank_for,
    merge_salient, prepare, recovery_summary, salient_params,
)
from .train import mean_loss, plot_loss, train
from .train_data import load_examples
from .utils import atomic_dir, atomic_write_json, peak_memory_mb

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise QRecoverError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def work_dir_for(out: Path) -> Path:
    """Where an interrupted quantization of `out` keeps its progress (never a valid checkpoint)."""
    return out.with_name(out.name + ".qrecover-work")


def quantize(
    model: str,
    out: str | Path,
    config: QuantConfig,
    calib: str = "default",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device=None,
    dtype="auto",
    batch_size: int = 8,
    overwrite: bool = False,
    eval_dataset: str | None = None,
    eval_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Load, calibrate, quantize, save checkpoint format v1 to `out`, optionally evaluate; returns the report."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise QRecoverError(f"output path {out} exists; choose another or pass --overwrite")
    start = time.perf_counter()
    net, tokenizer = load_pretrained(model, dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    # Round to nearest without salient columns reads only the weights: no calibration text is loaded.
    samples = calibration_samples(tokenizer, calib, nsamples, seqlen, seed) if config.needs_calibration else None
    work = work_dir_for(out)
    report = quantize_model(net, samples, config, device, batch_size, work_dir=work, progress=progress)
    report["model"] = str(model)
    if samples is not None:
        report["calibration"].update({"source": str(calib), "seed": seed})
    if eval_dataset:
        tokens = eval_tokens(tokenizer, eval_dataset)
        report["eval"] = {source_label(eval_dataset): perplexity(net, tokens, max_windows=eval_windows, progress=progress)}
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    report["peak_memory_mb"] = peak_memory_mb(report["device"])
    save_checkpoint(net, tokenizer, out, config, report=report, overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return report


def evaluate(
    path: str,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str = "cpu",
    dtype=None,
    report_path: str | Path | None = None,
    progress: bool = True,
    cache_weights: bool = False,
) -> dict:
    """Perplexity of a checkpoint or ordinary model on an evaluation text.

    cache_weights: dequantize every quantized linear once and keep it (memory for speed).
    """
    net, tokenizer = load(path, device=device, dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    if cache_weights:
        hold_dense_weights(net, True)
    result = {"model": str(path), "dataset": dataset, **perplexity(net, eval_tokens(tokenizer, dataset), seqlen, max_windows, progress)}
    if report_path is None and Path(path).is_dir():
        report_path = Path(path) / f"eval_{source_label(dataset)}.json"
    if report_path is not None:
        atomic_write_json(report_path, result)
    return result


def recover(
    model: str,
    out: str | Path,
    config: RecoverConfig,
    device=None,
    overwrite: bool = False,
    eval_dataset: str | None = None,
    eval_windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Recover a qrecover checkpoint (or fine-tune an ordinary model) on config.data; save to `out`.

    Resumes from `<out>.qrecover-work` when an earlier run with the same settings was interrupted.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise QRecoverError(f"output path {out} exists; choose another or pass --overwrite")
    start = time.perf_counter()
    from accelerate import PartialState

    process = PartialState()  # one process, or one of several under `accelerate launch`
    device = torch.device(device) if device else process.device
    qconfig = None
    if is_checkpoint(model):
        net, tokenizer, qconfig = load_checkpoint(model)
    else:
        net, tokenizer = load_pretrained(model, dtype=torch.float32)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    examples = load_examples(config.data, tokenizer, config.max_length)
    if examples.truncated or examples.dropped:
        print(
            f"qrecover: {examples.truncated} examples were longer than {config.max_length} tokens and were "
            f"truncated; {examples.dropped} had no response token left and were dropped", file=sys.stderr,
        )
    held_out = []
    if config.holdout:
        if config.holdout >= len(examples.items):
            raise QRecoverError(f"cannot hold out {config.holdout} of {len(examples.items)} examples; lower --holdout")
        held_out, examples.items = examples.items[-config.holdout :], examples.items[: -config.holdout]
    clock = NoiseClock(config.train.seed)
    if config.method == "gift" and qconfig is None:
        add_salient_columns(net, examples, config, pad_id)
    trainable = prepare(net, config, clock)
    if config.method == "lora":
        rank = config.lora_rank or lora_rank_for(net, salient_params(net, config))
        net = add_lora(net, rank)
        config.lora_rank = rank
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    net.to(device)
    dev_loss_before = mean_loss(net, held_out, pad_id) if held_out else None
    settings = {"model": str(model), **{k: v for k, v in config.to_dict().items() if k != "train"}}
    settings.update({k: v for k, v in config.to_dict()["train"].items() if k != "save_every"})
    hold_dense_weights(net, config.cache_weights)  # see RecoverConfig.cache_weights
    try:
        state = train(net, examples, pad_id, config.train, settings, work_dir_for(out), clock, progress)
    finally:
        hold_dense_weights(net, False)
    if not process.is_main_process:
        return {"out": str(out), "final_loss": state.log[-1]["loss"] if state.log else None}
    net = net.cpu()

    summary = recovery_summary(config, examples, trainable, time.perf_counter() - start)
    if held_out:
        summary["heldout_loss"] = {"before": dev_loss_before, "after": mean_loss(net, held_out, pad_id)}
    summary["peak_memory_mb"] = peak_memory_mb(device)

    def extras(tmp: Path):
        atomic_write_json(tmp / "recovery_log.json", {"recovery": summary, "log": state.log})
        plot_loss(state.log, tmp / "recovery_loss.png")

    if config.method == "gift":
        finish_gift(net)
    if qconfig is not None and config.method == "gift":
        report_path = Path(model) / REPORT
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        save_checkpoint(net, tokenizer, out, qconfig, report=report, recovery=summary, overwrite=overwrite, extras=extras)
    elif is_quantized(net):
        # LoRA on a quantized model: the adapter cannot be merged into packed weights; save it (peft
        # format) with the path of its base checkpoint, which qrecover.load follows.
        net.peft_config["default"].base_model_name_or_path = str(Path(model).resolve())
        atomic_dir(out, lambda tmp: (net.save_pretrained(tmp), tokenizer.save_pretrained(tmp), extras(tmp)), overwrite)
    else:
        if config.method == "lora":
            net = net.merge_and_unload()
        merge_salient(net)
        atomic_dir(out, lambda tmp: (net.save_pretrained(tmp), tokenizer.save_pretrained(tmp), extras(tmp)), overwrite)
    shutil.rmtree(work_dir_for(out), ignore_errors=True)

    result = {"out": str(out), "recovery": summary, "final_loss": state.log[-1]["loss"] if state.log else None}
    if eval_dataset:
        net.eval()
        result["eval"] = {source_label(eval_dataset): perplexity(net, eval_tokens(tokenizer, eval_dataset), max_windows=eval_windows, progress=progress)}
    return result
