"""`qrecover` command line: a thin layer over qrecover.api."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError

from ._version import __version__
from .config import METHODS, VALID_BITS, QuantConfig
from .errors import QRecoverError
from .eval.zeroshot import TASKS as ZEROSHOT_TASKS
from .api import DTYPES
from .models import LOADING
from .recovery.config import METHODS as RECOVER_METHODS, NOISE_KINDS, NOISE_PILOT_SCALES, OBJECTIVES, PRECISIONS
from .saliency import METRICS
from .utils import parse_size


def _override(text: str):
    """PATTERN=key:value[,key:value] -> (pattern, {key: value})."""
    pattern, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=key:value[,key:value]")
    values = {}
    for item in rest.split(","):
        key, sep, value = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not key:value")
        values[key.strip()] = value.strip() if key.strip() == "salient" else int(value)
    return pattern, values


def _bytes(text: str) -> int:
    try:
        return parse_size(text)
    except QRecoverError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_quantize(sub):
    p = sub.add_parser(
        "quantize",
        help="quantize a model to low-bit weights with 16-bit salient columns and save a checkpoint",
        description="Quantize every attention and MLP projection of a causal LM (the families of "
        "qrecover.models.ARCHITECTURES: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3) layer by layer "
        "with GPTQ (or RTN), keeping the most salient input columns of each in 16-bit, and save "
        "checkpoint format v1 with a JSON report (per-layer errors, salient columns, timings).",
    )
    p.add_argument("model", help="HF model directory, .gguf file, hub id (owner/name) or smollm2-135m")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--bits", type=int, default=4, choices=VALID_BITS, help="weight bit width (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale group; -1 = one group per row (default 128)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with a fitted zero point (default symmetric)")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order over all columns (groups follow the visiting order; g_idx stored)")
    p.add_argument("--no-group-aware", action="store_true", help="visit columns in natural order instead of group-aware act-order (GAR)")
    p.add_argument("--no-mse-clip", action="store_true", help="use the full weight range instead of the MSE-searched clip")
    p.add_argument("--method", default="gptq", choices=METHODS, help="gptq (error feedback through the Hessian) or rtn (round to nearest)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening as a fraction of its mean diagonal; raised automatically if needed (default 0.01)")
    p.add_argument("--salient", default="0", help="16-bit input columns per layer: a count (128), a fraction (0.03) or a percentage (3%%); default 0 = plain GPTQ")
    p.add_argument("--metric", default="gift", choices=sorted(METRICS), help="salient-column metric (default gift: max|W-Q(W)| * max|X|)")
    p.add_argument("--tau", type=float, help="override the metric's weight-side norm (e.g. inf, 2, 1)")
    p.add_argument("--rho", type=float, help="override the metric's activation-side norm")
    p.add_argument("--gamma", type=float, help="override the metric's activation exponent")
    p.add_argument("--override", type=_override, action="append", default=[], metavar="PATTERN=key:value",
                   help="per-module settings for module names matching the regex PATTERN, e.g. 'down_proj=bits:8' or 'layers\\.0\\.=salient:5%%'; repeatable")
    p.add_argument("--calib", default="default", help="calibration text: default (embedded), wikitext2, c4, pile, ptb, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration windows and random metrics")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass (default 8)")
    p.add_argument("--device", help="compute device (default: cuda if available, else cpu); the model stays on the CPU")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="dtype to load the model in (default: its own)")
    p.add_argument("--loading", default="auto", choices=LOADING, help="auto: a directory of sharded safetensors "
                   "(model.safetensors.index.json) is streamed, one decoder layer in memory at a time, anything else loaded "
                   "whole; stream: stream any safetensors directory; whole: load the whole model first")
    p.add_argument("--activation-memory", type=_bytes, metavar="SIZE", help="calibration activations kept in memory "
                   "(e.g. 4GB); past it they go to disk in the work folder (default: a quarter of the memory)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--eval", dest="eval_dataset", help="after quantizing, measure perplexity on this text (e.g. wikitext2)")
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows of 2048 tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_quantize)


def _run_quantize(args):
    from .api import quantize

    config = _config(QuantConfig, args, sym=not args.asym, group_aware=not args.no_group_aware,
                     mse_clip=not args.no_mse_clip, overrides=dict(args.override))
    show = _summary(lambda report: {"out": args.out, "seconds": report["seconds"], "peak_memory_mb": report["peak_memory_mb"]})
    quantize(
        args.model, args.out, config, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        overwrite=args.overwrite, eval_dataset=args.eval_dataset, eval_windows=args.eval_windows,
        progress=not args.quiet, echo=show, loading=args.loading, activation_memory=args.activation_memory,
    )


def _config(cls, args, **values):
    """A settings dataclass from the options named as its fields (the rest keep their defaults), and values."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)} | values)


def _summary(fields_of):
    """echo(result) for quantize and recover: the fields_of(result), and the perplexity of each --eval text."""

    def show(result):
        summary = fields_of(result)
        for name, value in result.get("eval", {}).items():
            summary[f"{name}_perplexity"] = round(value["perplexity"], 3)
        _print_json(summary)

    return show


def _print_json(result: dict) -> None:
    """Results go to the screen before any file that records them is written."""
    print(json.dumps(result), flush=True)


def _task_file(text: str) -> str:
    name, sep, path = text.partition("=")
    if not (name and sep and path):
        raise argparse.ArgumentTypeError(f"{text!r} is not TASK=PATH")
    return text


def _add_eval(sub):
    p = sub.add_parser(
        "eval",
        help="perplexity or zero-shot accuracy of a qrecover checkpoint or an ordinary model",
        description="Perplexity with the standard protocol: the text tokenized once, non-overlapping "
        "windows of --seqlen tokens, exp of the mean next-token loss. With --tasks or --task-file: "
        "zero-shot accuracy through lm-eval instead (acc_norm for ARC, HellaSwag, PIQA; acc for "
        "WinoGrande, BoolQ; and their mean). Writes a JSON report.",
    )
    p.add_argument("path", help="qrecover checkpoint directory, HF model directory, .gguf file, hub id or smollm2-135m")
    p.add_argument("--dataset", default="wikitext2", help="evaluation text: wikitext2, c4, ptb, pile, or a .txt/.jsonl file (default wikitext2 test)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--against", metavar="MODEL", help="fidelity instead of perplexity: mean and 99th-percentile KL divergence "
                   "from MODEL's next-token distributions (e.g. the full-precision model) and top-1 agreement, on the "
                   "--dataset windows (writes fidelity_<dataset>.json)")
    p.add_argument("--tasks", help=f"zero-shot tasks, comma-separated, from {','.join(ZEROSHOT_TASKS)}, each on its "
                   "standard dataset from the Hugging Face hub (or TASK=PATH, as --task-file); 'all' = the six")
    p.add_argument("--task-file", type=_task_file, action="append", default=[], metavar="TASK=PATH",
                   help="run TASK offline on a local .jsonl in its original format, e.g. arc_easy=ARC-Easy-Test.jsonl "
                   "(AI2 format), piqa=valid.jsonl (goal/sol1/sol2/label); repeatable")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=32, help="zero-shot: requests per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="dtype of the unquantized tensors (default: as stored)")
    p.add_argument("--report", help="JSON report path (default: eval_<dataset>.json, or eval_zeroshot.json, inside a model directory)")
    p.add_argument("--per-example", action="store_true", help="zero-shot: record each example's result in the "
                   "report, for paired comparisons of two models (tools/paired_zeroshot.py)")
    p.add_argument("--cache-weights", action="store_true", help="dequantize the quantized weights once and keep "
                   "them (float32): faster, for the memory of an unquantized copy")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="perplexity forwards: auto (default) under "
                   "bfloat16 autocast where the hardware multiplies it (CUDA, AMX, AVX512-BF16), else float32; the "
                   "log-softmax is float32 either way")
    p.add_argument("--quiet", action="store_true", help="no progress bar (perplexity; lm-eval draws its own)")
    p.set_defaults(run=_run_eval)


def _run_eval(args):
    if args.tasks or args.task_file:
        return _run_zeroshot(args)
    from .api import evaluate

    evaluate(args.path, args.dataset, args.seqlen, args.max_windows, args.device, args.dtype, args.report,
             not args.quiet, args.cache_weights, echo=_print_json, against=args.against, precision=args.precision)


def _run_zeroshot(args):
    from .api import zeroshot
    from .api import parse_dtype
    from .outputs import write_report

    local = {spec.partition("=")[0] for spec in args.task_file}
    tasks = [t for t in ZEROSHOT_TASKS if t not in local] if args.tasks == "all" else (args.tasks or "").split(",")
    result = zeroshot(args.path, [*tasks, *args.task_file], limit=args.limit, batch_size=args.batch_size,
                      device=args.device, dtype=parse_dtype(args.dtype), cache_weights=args.cache_weights,
                      per_example=args.per_example)
    _print_json(result)
    report = args.report or (Path(args.path) / "eval_zeroshot.json" if Path(args.path).is_dir() else None)
    if report is not None:
        write_report(report, result)


def _add_recover(sub):
    p = sub.add_parser(
        "recover",
        help="recover a quantized checkpoint by noise-injected training of its salient columns (GIFT-SW)",
        description="Train only the 16-bit salient columns of a qrecover checkpoint while the frozen "
        "quantized weights compute with Gaussian noise of half their quantization step (GIFT-SW); or "
        "fine-tune an ordinary model the same way (columns picked by the metric, merged back on export). "
        "Baselines: --noise none, --method lora, --method full. Interrupted runs resume from "
        "<out>.qrecover-work with the same settings.",
    )
    p.add_argument("model", help="qrecover checkpoint directory, or an ordinary model (HF directory, .gguf, hub id, smollm2-135m)")
    p.add_argument("--out", required=True, help="output directory (checkpoint format v1 for checkpoints, an HF model otherwise)")
    p.add_argument("--data", default="default", help="training data: default, wikitext2, c4, a .txt file (language modelling), "
                   "a .jsonl of instruction/chat records (loss on responses only), tulu-v2-mix, openorca, self (text the "
                   "teacher writes, see --self-samples), or a mixture by weight such as default:0.5,self:0.5 (default: default)")
    p.add_argument("--objective", default="auto", choices=OBJECTIVES, help="kd: KL divergence from the teacher's next-token "
                   "distribution to the student's at every position; ce: cross-entropy on the data; kd+ce: a mix (--kd-weight); "
                   "auto (default): kd for a quantized checkpoint, ce for an ordinary model")
    p.add_argument("--kd-weight", type=float, default=0.5, help="kd+ce: weight of the KL term (default 0.5)")
    p.add_argument("--teacher", help="teacher model for kd and --data self (default: the model the checkpoint was quantized from, "
                   "as recorded in it); live teachers stay resident beside the student: two models in memory")
    p.add_argument("--teacher-cache", help="folder for the teacher's top-k log-probabilities, computed once before training "
                   "(about 8 * top-k bytes per training token: 262 KB per 512-token block at k = 64) and reused by reruns, "
                   "pilots and other runs on the same text; the teacher is then loaded only for text not yet cached")
    p.add_argument("--teacher-topk", type=int, default=64, help="tokens per position kept in the teacher cache (default 64)")
    p.add_argument("--self-samples", type=int, default=64, help="--data self: sequences the teacher writes (default 64, of --max-length tokens)")
    p.add_argument("--self-temperature", type=float, default=1.0, help="--data self: sampling temperature (default 1)")
    p.add_argument("--self-top-p", type=float, default=0.95, help="--data self: nucleus sampling threshold (default 0.95)")
    p.add_argument("--method", default="gift", choices=RECOVER_METHODS, help="gift (salient columns, default), lora (peft adapters), full (unquantized only)")
    p.add_argument("--noise", default="none", choices=NOISE_KINDS, help="noise on the frozen weights in training: gaussian N(0, (s*Delta/2)^2) "
                   "(GIFT-SW, the paper's setting), uniform, or none (default: what measured best on SmolLM2, docs/BENCHMARKS.md)")
    p.add_argument("--noise-scale", default="1", help="multiplier s of the noise (default 1: the paper's Delta/2), or auto: "
                   f"pilots of --pilot-steps steps at s in {{{', '.join(f'{v:g}' for v in NOISE_PILOT_SCALES)}}} scored on the "
                   "--holdout examples, the best kept")
    p.add_argument("--pilot-steps", type=int, default=10, help="--noise-scale auto: steps per pilot (default 10)")
    p.add_argument("--noise-bits", type=int, choices=(2, 3, 4, 8), help="take Delta from a per-row grid of this width instead of the layer's own (default: own; 4 for unquantized)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example: text block length, or truncation of longer conversations (default 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    p.add_argument("--scale-lr", type=float, default=0.0, help="quantized checkpoints: also train each group's scale "
                   "(the integer codes stay; EfficientQAT's end-to-end step), at this learning rate, about the relative change "
                   "per step, e.g. 1e-3 (default 0: frozen); with no salient columns the checkpoint stays a plain GPTQ model")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the cosine schedule (default 0.03)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    p.add_argument("--holdout", type=int, default=0, help="keep the last N examples out of training and report their loss before and after (for choosing settings without the test set)")
    p.add_argument("--train-norms", action="store_true", help="also train the RMSNorm weights")
    p.add_argument("--lora-rank", type=int, help="LoRA rank (default: about as many parameters as the salient columns)")
    p.add_argument("--salient", default="128", help="unquantized models: salient columns per layer, count/fraction/percentage (default 128)")
    p.add_argument("--metric", default="gift", choices=sorted(METRICS), help="unquantized models: salient-column metric (default gift)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="bf16: forward and backward under bfloat16 autocast "
                   "(the head too; softmaxes, losses, trained columns and optimizer in float32); auto (default): bf16 where the hardware multiplies bfloat16 "
                   "(CUDA, CPUs with AMX or AVX512-BF16), fp32 elsewhere")
    p.add_argument("--cache-weights", action="store_true", help="keep the dequantized frozen weights during training: "
                   "faster steps, for a float32 copy of the quantized weights in memory (nothing with --scale-lr: those weights change)")
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable checkpoints (default 50; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the noise")
    p.add_argument("--device", help="training device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--eval", dest="eval_dataset", help="after training, measure perplexity on this text (e.g. wikitext2)")
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows of 2048 tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_recover)


def _run_recover(args):
    from .api import recover
    from .recovery.config import RecoverConfig, TrainConfig

    config = _config(RecoverConfig, args, train=_config(TrainConfig, args))
    # Only the main process of an `accelerate launch` reports.
    show = _summary(lambda result: {"out": result["out"], "final_loss": result["final_loss"], "trainable_params":
                                    result["recovery"]["trainable_params"], "seconds": result["recovery"]["seconds"]})
    recover(args.model, args.out, config, args.device, args.overwrite, args.eval_dataset, args.eval_windows, not args.quiet, echo=show)


def _add_run(sub):
    p = sub.add_parser(
        "run",
        help="run a recipe: quantize -> recover -> evaluate -> export, resumable",
        description="Run the chain a YAML recipe describes (see recipes/). Finished stages are kept "
        "under <out>/stages and skipped on a rerun; an interrupted stage resumes where it stopped. "
        "The final checkpoint is <out>/model and the numbers are in <out>/summary.json.",
    )
    p.add_argument("recipe", help="path of the recipe YAML file")
    p.add_argument("--until", default="export", choices=("quantize", "recover", "evaluate", "export"),
                   help="stop after this stage (e.g. quantize in one process before a multi-GPU recovery)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_recipe)


def _run_recipe(args):
    from .recipes import load_recipe, run_recipe

    summary = run_recipe(load_recipe(args.recipe), progress=not args.quiet, until=args.until)
    print(json.dumps({"model": summary.get("model"), "evaluate": summary.get("evaluate")}))


def _add_export(sub):
    from .export import FORMATS, VLLM_LORA_RANKS

    p = sub.add_parser(
        "export",
        help="export a checkpoint for other tools: a GPTQ base + exact LoRA adapter, a dense model, or plain GPTQ",
        description="gptq-lora: DIR/base, a standard GPTQ v1 checkpoint (transformers, GPTQModel, vLLM load it), and "
        "DIR/adapter, a PEFT LoRA adapter that computes the 16-bit salient columns exactly (rank padded to one vLLM "
        f"serves: {', '.join(map(str, VLLM_LORA_RANKS))}; lora_alpha = r, scale 1); a checkpoint without salient "
        "columns exports the base alone, a LoRA recovery its adapter plus the columns. dense: an ordinary 16-bit "
        "model with everything merged, loadable without qrecover. gptq: the base alone with the salient columns "
        "rounded into its grid (lossy; prints the perplexity it costs).",
    )
    p.add_argument("checkpoint", help="qrecover checkpoint directory, or a LoRA recovery of one (recover --method lora)")
    p.add_argument("--to", default="gptq-lora", choices=FORMATS, help="export format (default gptq-lora)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="dtype of the 16-bit tensors (default float16)")
    p.add_argument("--eval", dest="eval_dataset", default="wikitext2", help="--to gptq: text on which to print the perplexity before and after rounding (default wikitext2)")
    p.add_argument("--eval-windows", type=int, default=4, help="--to gptq: windows of 2048 tokens for that perplexity (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it is an earlier qrecover output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_export)


def _run_export(args):
    from .export import export

    _print_json(export(args.checkpoint, args.out, args.to, DTYPES[args.dtype], args.overwrite, args.eval_dataset,
                       args.eval_windows, not args.quiet))


def _csv(cast):
    return lambda text: [cast(v) for v in text.split(",") if v.strip()]


def _add_compare(sub):
    from .bench.compare import METHODS as COMPARE_METHODS, PRESETS

    p = sub.add_parser(
        "compare",
        help="qrecover against RTN, GPTQ (GPTQModel), AWQ and LoRA on your model and data",
        description="Quantize MODEL at each bit width with every method on the same calibration data, "
        "evaluate all of them, and write comparison.md/.csv/.json and plots to --out. Each stage runs "
        "in its own process; finished stages are reused on a rerun, and a rerun that changes only --eval, "
        "--tasks, --limit or --eval-windows re-evaluates their saved checkpoints without rebuilding them. Methods whose package is missing "
        "are skipped with a line saying how to install it.",
    )
    p.add_argument("model", help="HF model directory, hub id or smollm2-135m")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--bits", type=_csv(int), default=[4, 3, 2], help="comma-separated bit widths (default 4,3,2)")
    p.add_argument("--methods", type=_csv(str), default=list(COMPARE_METHODS), help=f"comma-separated subset of {','.join(COMPARE_METHODS)}")
    p.add_argument("--preset", default="reduced", choices=sorted(PRESETS),
                   help="budget: reduced (16 x 512 calibration, 20 recovery steps of 2 x 512, 4 eval windows; "
                   "about 40 minutes for 3 bit widths of SmolLM2-135M on 2 CPU cores, plus GPTQModel's AWQ) or full "
                   "(128 x 2048, 100 steps of 4 x 512, all windows). The run ends with its time and an estimate for the full preset")
    p.add_argument("--group-size", type=int, default=128, help="group size of every method (AWQ falls back to 64/32 when needed)")
    p.add_argument("--asym", action="store_true", help="asymmetric grids (a fitted zero point) for qrecover's methods and "
                   "GPTQModel's GPTQ (default symmetric; AWQ's grid is always asymmetric)")
    p.add_argument("--no-mse-clip", action="store_true", help="qrecover's methods round over each group's full range "
                   "instead of an MSE-searched clip, as GPTQModel does by default")
    p.add_argument("--damp", type=float, help="GPTQ dampening (fraction of the Hessian's mean diagonal) for qrecover and "
                   "GPTQModel alike (default: each tool's own, 0.01 and 0.05)")
    p.add_argument("--salient", default="3%", help="salient columns of the qrecover methods (default 3%%)")
    p.add_argument("--calib", default="wikitext2", help="calibration text shared by all methods")
    p.add_argument("--train-data", default="wikitext2", help="recovery training data (gift, lora)")
    p.add_argument("--objective", default="kd", choices=("kd", "ce", "kd+ce"), help="objective of both recoveries (gift, lora): "
                   "distillation from MODEL (default) or cross-entropy on --train-data (the paper)")
    p.add_argument("--eval", dest="eval_datasets", type=_csv(str), default=["wikitext2"], help="comma-separated perplexity texts")
    p.add_argument("--tasks", type=_csv(str), default=[], help="zero-shot tasks, comma-separated (lm-eval names or NAME=PATH)")
    p.add_argument("--limit", type=int, help="zero-shot examples per task")
    p.add_argument("--eval-windows", type=int, help="perplexity windows of 2048 tokens (default: the preset's; 0: all)")
    p.add_argument("--device", help="compute device for quantization and training")
    p.set_defaults(run=_run_compare)


def _run_compare(args):
    from .bench.compare import Comparison, run_compare

    run_compare(_config(Comparison, args, sym=not args.asym, mse_clip=not args.no_mse_clip))
    print((Path(args.out) / "comparison.md").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrecover",
        description="Low-bit quantization with 16-bit salient columns, recovered by noise-injected fine-tuning (GIFT-SW).",
    )
    parser.add_argument("--version", action="version", version=f"qrecover {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_quantize(sub)
    _add_recover(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_export(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="on an error, show its Python traceback too")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except QRecoverError as e:
        if args.debug:
            raise
        print(f"qrecover: error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:
        # A disk or file problem met where qrecover did not expect one: still no traceback.
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"qrecover: error: {getattr(e, 'strerror', None) or e}{where}; rerun with --debug for the traceback", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qrecover: interrupted; rerun the same command to resume from its .qrecover-work directory", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
