"""qrecover's public API, which the CLI and recipes call: load, quantize, recover, evaluate, zeroshot."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .config import QuantConfig, check_choice
from .data import calibration_samples, eval_tokens, source_label
from .errors import QRecoverError
from .eval.fidelity import fidelity as fidelity_of
from .eval.perplexity import perplexity
from .eval.zeroshot import zeroshot as zeroshot_of
from .io import REPORT, checkpoint_source, is_checkpoint, load_checkpoint, save_checkpoint, save_streamed_checkpoint
from .models import LOADING, load_for_quantization, load_pretrained
from .nn import hold_dense_weights
from .pipeline import layer_file, quantize_model
from .recovery.config import NOISE_PILOT_SCALES, PRECISIONS, RecoverConfig
from .recovery.data import BatchOrder, load_examples, mix, parse_sources
from .recovery.model import (
    add_lora, add_salient_columns, finish, is_quantized, load_lora, lora_rank_for, merge_salient, recovery_summary,
    restore, salient_params, start, trainable_state,
)
from .recovery.memory import describe, memory_plan
from .recovery.noise import NoiseClock
from .recovery.objective import Objective
from .recovery.teacher import Teacher
from .recovery.trainer import mean_loss, plot_loss, process_state, train
from .outputs import atomic_dir, check_output, write_report
from .utils import atomic_write_json, native_bf16, peak_memory_mb

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(spec, device="cpu", dtype=None, cache_weights: bool = False):
    """(model, tokenizer) of a qrecover checkpoint, a LoRA adapter on one, or an ordinary model spec;
    cache_weights keeps the quantized linears dequantized (memory for speed)."""
    if (Path(spec) / "adapter_config.json").is_file():
        model, tokenizer = load_lora(spec)
        model = model.to(device)
    elif is_checkpoint(spec):
        model, tokenizer, _ = load_checkpoint(spec, device, None if dtype == "auto" else dtype)
    else:
        model, tokenizer = load_pretrained(spec, dtype=dtype or "auto", device=device)
    if cache_weights:
        hold_dense_weights(model, True)
    return model, tokenizer


def zeroshot(model, tasks=None, *, tokenizer=None, device: str = "cpu", dtype=None, cache_weights: bool = False, **options) -> dict:
    """Zero-shot accuracy (eval.zeroshot.zeroshot) of an in-memory model with its tokenizer, or of a
    checkpoint or model spec loaded here (cache_weights: see load)."""
    if isinstance(model, (str, Path)):
        options["name"] = str(model)
        model, tokenizer = load(model, device=device, dtype=dtype, cache_weights=cache_weights)
    return zeroshot_of(model, tasks, tokenizer=tokenizer, **options)


def score(model, tokenizer, texts=(), *, reference=None, seqlen: int = 2048, max_windows: int | None = None,
          tasks=(), limit: int | None = None, per_example: bool = False, progress: bool = True,
          precision: str = "auto") -> dict:
    """Every score of an in-memory model, the one evaluation driver of evaluate, recipes and compare:
    for each text (keyed by its label) its perplexity, or with a reference model its fidelity to that
    model (eval/fidelity.py, perplexity included), with the number of whole windows the text holds;
    with tasks their zero-shot scores under "zeroshot". precision: of the perplexity forwards, auto
    (bfloat16 autocast where the hardware multiplies it, as recovery's precision: auto), fp32 or bf16."""
    check_choice(precision, PRECISIONS, "precision")
    device = next(model.parameters()).device
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
    results = {}
    for text in texts:
        tokens = eval_tokens(tokenizer, text)
        if reference is None:
            result = perplexity(model, tokens, seqlen, max_windows, progress, bf16=bf16)
        else:
            result = fidelity_of(model, reference, tokens, seqlen, max_windows, progress)
        results[source_label(text)] = result | {"windows_available": tokens.shape[1] // seqlen}
    if tasks:
        results["zeroshot"] = zeroshot_of(model, tasks, tokenizer=tokenizer, limit=limit, per_example=per_example)
    return results


def parse_dtype(name: str):
    check_choice(name, DTYPES, "dtype")
    return DTYPES[name]


def model_source(spec: str) -> str:
    """How a checkpoint names the model it was quantized from: an absolute path for a local model
    (found again from any working directory), else the alias or hub id as given."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


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
    echo: Callable[[dict], None] | None = None,
    loading: str = "auto",
    activation_memory: int | None = None,
) -> dict:
    """Load, calibrate, quantize, optionally evaluate, save checkpoint format v1 to `out`; returns
    the report. echo(report) shows it before the checkpoint is written (a failed write loses no number).

    loading: "auto" streams a directory of sharded safetensors one decoder layer at a time and loads
    anything else whole (models.load_for_quantization); activation_memory: bytes of calibration
    activations kept in memory, the rest on disk in the work folder (default: a quarter of memory)."""
    check_choice(loading, LOADING, "loading")
    out = check_output(out, [model, calib], overwrite)
    start = time.perf_counter()
    net, tokenizer, shards = load_for_quantization(model, parse_dtype(dtype) if isinstance(dtype, str) else dtype, loading)
    # Round to nearest without salient columns reads only the weights: no calibration text is loaded.
    samples = calibration_samples(tokenizer, calib, nsamples, seqlen, seed) if config.needs_calibration else None
    work = work_dir_for(out)
    report = quantize_model(net, samples, config, device, batch_size, work_dir=work, progress=progress, shards=shards,
                            activation_memory=activation_memory)
    report["model"] = str(model)
    if samples is not None:
        report["calibration"].update({"source": str(calib), "seed": seed})
    if eval_dataset and shards is None:
        report["eval"] = score(net, tokenizer, [eval_dataset], max_windows=eval_windows, progress=progress)
    before = (report["resumed"] or {}).get("seconds_before", 0.0)
    report["total_seconds"] = round(before + time.perf_counter() - start, 2)  # earlier interrupted runs' work included
    report["peak_memory_mb"] = peak_memory_mb(report["device"])
    if shards is None:
        if echo is not None:
            echo(report)
        save_checkpoint(net, tokenizer, out, config, report=report, overwrite=overwrite, source=model_source(model))
    else:
        layers = [layer_file(work, i) for i in range(len(report["layers"]))]
        save_streamed_checkpoint(net, tokenizer, out, config, shards, layers, report, overwrite, model_source(model))
        if eval_dataset:  # a streamed model is only whole on disk: evaluated from its checkpoint
            report["eval"] = {source_label(eval_dataset): evaluate(str(out), eval_dataset, max_windows=eval_windows, progress=progress)}
        if echo is not None:
            echo(report)
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
    echo: Callable[[dict], None] | None = None,
    against: str | None = None,
    precision: str = "auto",
) -> dict:
    """Perplexity of a checkpoint or ordinary model on an evaluation text or, with `against`, how close
    its next-token distributions are to that model's (eval/fidelity.py). echo(result) shows it before
    its report (eval_<text>.json or fidelity_<text>.json in a checkpoint directory) is written.

    cache_weights: dequantize every quantized linear once and keep it (memory for speed).
    """
    net, tokenizer = load(path, device, parse_dtype(dtype) if isinstance(dtype, str) else dtype, cache_weights)
    reference = None
    if against is not None:
        reference, ref_tokenizer = load(against, device=device)
        if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise QRecoverError(f"{path} and {against} have different tokenizers: their next-token distributions cannot be compared")
    label = source_label(dataset)
    scores = score(net, tokenizer, [dataset], reference=reference, seqlen=seqlen, max_windows=max_windows, progress=progress,
                   precision=precision)
    result = {"model": str(path), **({"against": str(against)} if against else {}), "dataset": dataset, **scores[label]}
    if report_path is None and Path(path).is_dir():
        report_path = Path(path) / f"{'fidelity' if against else 'eval'}_{label}.json"
    if echo is not None:
        echo(result)
    if report_path is not None:
        write_report(report_path, result)
    return result


def _teacher_for(model: str, config: RecoverConfig, tokenizer, device, progress: bool) -> Teacher:
    spec = config.teacher or (checkpoint_source(model) if is_checkpoint(model) else None)
    if spec is None:
        raise QRecoverError(
            f"distillation needs a teacher, and {model} names none (an ordinary model, or a checkpoint "
            "written before qrecover recorded its source): pass --teacher MODEL, or --objective ce"
        )
    # On a GPU under bf16 the teacher is held in bfloat16 (half the memory); on a CPU in float32,
    # its matmuls under the same autocast as the student's.
    dtype = torch.bfloat16 if config.train.bf16_on(device) and torch.device(device).type == "cuda" else torch.float32
    return Teacher(spec, tokenizer, device, config.teacher_topk, config.teacher_cache, progress, dtype)


def _training_examples(config: RecoverConfig, tokenizer, teacher: Teacher | None):
    """The examples of config.data: one source or a mixture, `self` written by the teacher."""
    parts = []
    for source, weight in parse_sources(config.data):
        if source == "self":
            source = str(teacher.write_text(
                config.self_samples, config.max_length, config.self_temperature, config.self_top_p,
                config.train.seed, Path(config.teacher_cache) if config.teacher_cache else None,
            ))
        parts.append((load_examples(source, tokenizer, config.max_length), weight))
    return mix(parts, config.train.seed)


def _pick_noise_scale(net, examples, held_out, pad_id, config: RecoverConfig, objective, clock) -> tuple[float, list]:
    """Short pilots from the same start, one per noise scale; the lowest held-out objective wins."""
    initial = trainable_state(net)
    pilot = replace(config.train, steps=config.pilot_steps, save_every=0)
    rows = []
    for scale in NOISE_PILOT_SCALES:
        restore(net, initial, scale)
        train(net, examples, pad_id, pilot, objective, {}, None, clock, progress=False)
        rows.append({"noise_scale": scale, "heldout_loss": mean_loss(net, held_out, pad_id, objective)})
        print(f"qrecover: noise pilot s = {scale:g}: held-out {objective.kind} loss {rows[-1]['heldout_loss']:.4f}", file=sys.stderr)
    best = min(rows, key=lambda r: r["heldout_loss"])["noise_scale"]
    restore(net, initial, best)
    print(f"qrecover: noise scale {best:g} chosen by {len(rows)} pilots of {config.pilot_steps} steps", file=sys.stderr)
    return best, rows


def recover(
    model: str,
    out: str | Path,
    config: RecoverConfig,
    device=None,
    overwrite: bool = False,
    eval_dataset: str | None = None,
    eval_windows: int | None = None,
    progress: bool = True,
    echo: Callable[[dict], None] | None = None,
) -> dict:
    """Recover a qrecover checkpoint (or fine-tune an ordinary model) on config.data; save to `out`.

    Resumes from `<out>.qrecover-work` when an earlier run with the same settings was interrupted.
    echo(result) shows the result before the output is written.
    """
    inputs = [model, config.teacher, *(source for source, _ in parse_sources(config.data))]
    out = check_output(out, inputs, overwrite)
    start_time = time.perf_counter()
    process = process_state()  # one process, or one of several under `accelerate launch`
    device = torch.device(device) if device else process.device
    qconfig = None
    if is_checkpoint(model):
        net, tokenizer, qconfig = load_checkpoint(model)
    else:
        net, tokenizer = load_pretrained(model, dtype=torch.float32)
    kind = config.objective_for(quantized=qconfig is not None)
    uses_self = any(source == "self" for source, _ in parse_sources(config.data))
    teacher = _teacher_for(model, config, tokenizer, device, progress) if kind != "ce" or uses_self else None
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    examples = _training_examples(config, tokenizer, teacher)
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
    if config.noise_scale == "auto" and not held_out:
        raise QRecoverError("--noise-scale auto scores its pilots on held-out examples: add --holdout N (e.g. 8)")
    if config.noise_scale == "auto" and (config.method != "gift" or config.noise == "none"):
        raise QRecoverError("--noise-scale auto chooses the scale of GIFT-SW's noise: use --method gift with --noise gaussian or uniform")
    clock = NoiseClock(config.train.seed)
    if config.method == "gift" and qconfig is None:
        add_salient_columns(net, examples, config, pad_id)
    trainable = start(net, config, clock, noise_scale=0.0 if config.noise_scale == "auto" else None)
    if config.method == "lora":
        rank = config.lora_rank or lora_rank_for(net, salient_params(net, config))
        net = add_lora(net, rank)
        config.lora_rank = rank
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    net.to(device)
    if config.train.precision == "bf16" and not native_bf16(device):
        print(f"qrecover: {device} has no bfloat16 arithmetic (CUDA, or a CPU with AMX or AVX512-BF16): bf16 is "
              "emulated here, many times slower than fp32; --precision auto trains in float32", file=sys.stderr)
    objective = Objective(kind, teacher, config.kd_weight, config.train.bf16_on(device))
    if teacher is not None and config.teacher_cache:
        # Once, for the examples training will visit and the held-out ones; pilots and reruns reuse it.
        order = BatchOrder(len(examples.items), config.train.batch_size, config.train.seed)
        visits = config.train.steps * config.train.grad_accum * process.num_processes
        visited = sorted({i for position in range(visits) for i in order.indices(position)})
        teacher.fill([examples.items[i] for i in visited] + held_out, pad_id)
    plan = memory_plan(net, config, qconfig, objective.bf16, teacher_live=teacher is not None and not config.teacher_cache,
                       on_gpu=torch.device(device).type == "cuda")
    if process.is_main_process:
        print(f"qrecover: memory plan: {describe(plan)}", file=sys.stderr)
    if plan["teacher"]:
        # Loaded now, not inside the first step: its load (the file's pages beside the converted
        # weights) would otherwise stack on the step's activations (+3 GB on the 1B shape, measured).
        teacher.model
    # See RecoverConfig.cache_weights; layers that train their scales rebuild the weight anyway.
    hold_dense_weights(net, config.cache_weights and not config.train.scale_lr)
    pilots = None
    if config.noise_scale == "auto":
        noise_scale, pilots = _pick_noise_scale(net, examples, held_out, pad_id, config, objective, clock)
    dev_loss_before = mean_loss(net, held_out, pad_id, objective) if held_out else None
    settings = {"model": str(model), **{k: v for k, v in config.to_dict().items() if k != "train"}}
    settings.update({k: v for k, v in config.to_dict()["train"].items() if k != "save_every"})
    try:
        state = train(net, examples, pad_id, config.train, objective, settings, work_dir_for(out), clock, progress)
    finally:
        hold_dense_weights(net, False)
    if teacher is not None:
        teacher.save()
    if not process.is_main_process:
        return {"out": str(out), "final_loss": state.log[-1]["loss"] if state.log else None}

    # The seconds cover every run: this one and the training steps of interrupted earlier ones.
    summary = recovery_summary(config, examples, trainable, state.seconds_before + time.perf_counter() - start_time)
    summary["objective_used"] = kind
    summary["memory_plan_gb"] = {k: round(v / 2**30, 3) for k, v in plan.items()}
    summary["precision_used"] = "bf16" if objective.bf16 else "fp32"
    if teacher is not None:
        summary["teacher"] = {"model": teacher.spec, "digest": teacher.digest, "cache": config.teacher_cache}
    if pilots is not None:
        summary.update(noise_scale_used=noise_scale, noise_pilots=pilots)
    if held_out:
        summary["heldout_loss"] = {"objective": kind, "before": dev_loss_before, "after": mean_loss(net, held_out, pad_id, objective)}
    if teacher is not None:
        teacher.release()
    net = net.cpu()
    summary["peak_memory_mb"] = peak_memory_mb(device)

    def extras(tmp: Path):
        atomic_write_json(tmp / "recovery_log.json", {"recovery": summary, "log": state.log})
        plot_loss(state.log, tmp / "recovery_loss.png")

    if config.method == "gift":
        finish(net)
    result = {"out": str(out), "recovery": summary, "final_loss": state.log[-1]["loss"] if state.log else None}
    if eval_dataset:
        net.eval()
        result["eval"] = score(net, tokenizer, [eval_dataset], max_windows=eval_windows, progress=progress)
    if echo is not None:
        echo(result)
    if qconfig is not None and config.method == "gift":
        report_path = Path(model) / REPORT
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        save_checkpoint(net, tokenizer, out, qconfig, report=report, recovery=summary, overwrite=overwrite,
                        extras=extras, source=checkpoint_source(model))
    elif is_quantized(net):
        # LoRA on a quantized model: the adapter cannot be merged into packed weights; save it (peft
        # format) with the path of its base checkpoint, which qrecover.load follows.
        net.peft_config["default"].base_model_name_or_path = str(Path(model).resolve())
        atomic_dir(out, lambda tmp: (net.save_pretrained(tmp), tokenizer.save_pretrained(tmp), extras(tmp)), overwrite, kind="adapter")
    else:
        if config.method == "lora":
            net = net.merge_and_unload()
        merge_salient(net)
        atomic_dir(out, lambda tmp: (net.save_pretrained(tmp), tokenizer.save_pretrained(tmp), extras(tmp)), overwrite, kind="model")
    shutil.rmtree(work_dir_for(out), ignore_errors=True)
    return result
