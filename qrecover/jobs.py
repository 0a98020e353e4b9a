"""The jobs behind the CLI, callable from Python: quantize a model end to end; evaluate one."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .config import QuantConfig
from .data import calibration_samples, eval_tokens, source_label
from .errors import QRecoverError
from .eval.perplexity import perplexity
from .io import load, save_checkpoint
from .models import load_pretrained
from .pipeline import quantize_model
from .utils import atomic_write_json, peak_memory_mb

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
    samples = calibration_samples(tokenizer, calib, nsamples, seqlen, seed)
    work = work_dir_for(out)
    report = quantize_model(net, samples, config, device, batch_size, work_dir=work, progress=progress)
    report["model"] = str(model)
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
) -> dict:
    """Perplexity of a checkpoint or ordinary model on an evaluation text."""
    net, tokenizer = load(path, device=device, dtype=parse_dtype(dtype) if isinstance(dtype, str) else dtype)
    result = {"model": str(path), "dataset": dataset, **perplexity(net, eval_tokens(tokenizer, dataset), seqlen, max_windows, progress)}
    if report_path is None and Path(path).is_dir():
        report_path = Path(path) / f"eval_{source_label(dataset)}.json"
    if report_path is not None:
        atomic_write_json(report_path, result)
    return result
