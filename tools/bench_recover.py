"""Recovery benchmark on SmolLM2-135M-Instruct: GIFT-SW against its baselines at the same budget.

For each bit width, qrecover quantizes the model once (g128, 3% salient columns, `gift` metric,
N x L calibration tokens of wikitext2-valid.txt); then, from that same checkpoint and on the same
training text (wikitext2-valid.txt) with the same steps, batch and sequence length:
- gift:     salient columns trained with Gaussian noise of half the quantization step (GIFT-SW);
- no-noise: the same without noise;
- lora:     LoRA adapters on every projection, about as many trainable parameters;
- gift-s0.5, gift-s0.25 (only when asked): GIFT-SW with half or a quarter of the noise, ablations;
- kd, kd-lora (only when asked): salient columns without noise, or LoRA, trained to the full-precision
  model's next-token distributions (distillation) instead of the text's tokens. Every other
  method trains on cross-entropy, as the paper does.
Each run is its own subprocess (peak memory of its own). Reports WikiText-2 test perplexity over
the first W windows of 2048 tokens for full precision, before recovery and after each method,
with trainable parameters, peak memory and wall time; with --tasks, also the zero-shot accuracy of
every model (lm-eval, e.g. the offline ARC-Easy and PIQA files): text the recovery never trained on,
where a regularizer such as GIFT-SW's noise should show if it helps. Prints a table and writes JSON.

The learning rate of each method is chosen, never on the test split, by short pilot runs over the
--lrs grid at the first bit width: the one with the lowest loss on --holdout training blocks kept
out of training (in every run, so all methods train on the same text).

    .venv/bin/python tools/bench_recover.py                       # w3 and w2, 100 steps of 4 x 512
    .venv/bin/python tools/bench_recover.py --bits 3 --steps 20   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (method, noise, noise scale, objective); gift-s0.5 and gift-s0.25 are ablations, not in the
# default set: noise std Delta/4 (about the rounding error's own, Delta/sqrt(12)) and Delta/8, against
# GIFT-SW's Delta/2.
METHODS = {"gift": ("gift", "gaussian", 1.0, "ce"), "no-noise": ("gift", "none", 1.0, "ce"), "lora": ("lora", "none", 1.0, "ce"),
           "gift-s0.5": ("gift", "gaussian", 0.5, "ce"), "gift-s0.25": ("gift", "gaussian", 0.25, "ce"),
           "kd": ("gift", "none", 1.0, "kd"), "kd-lora": ("lora", "none", 1.0, "kd")}
DEFAULT_METHODS = ["gift", "no-noise", "lora"]


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import qrecover
    from qrecover.api import recover
    from qrecover.models import reference_model_dir
    from qrecover.recovery.config import RecoverConfig, TrainConfig

    kind, bits = args.one.split(":")
    checkpoint = Path(args.work) / f"w{bits}"
    result = {"run": kind, "bits": None if bits == "16" else int(bits)}
    start = time.perf_counter()
    if kind == "full-precision":
        model, tokenizer = qrecover.load_pretrained(str(reference_model_dir()))
    elif kind == "before":
        if not checkpoint.exists():
            cfg = qrecover.QuantConfig(bits=int(bits), group_size=128, salient=args.salient, metric="gift")
            qrecover.quantize("smollm2-135m", checkpoint, cfg, calib="wikitext2", nsamples=args.nsamples, seqlen=args.seqlen, progress=False)
        model, tokenizer = qrecover.load(checkpoint)
    else:
        method, noise, scale, objective = METHODS[kind]
        config = RecoverConfig(
            data="wikitext2", method=method, objective=objective, noise=noise, noise_scale=scale, max_length=args.seqlen,
            holdout=args.holdout, cache_weights=args.weights == "cached", teacher_cache=args.teacher_cache,
            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=0, seed=0,
                              precision=args.precision),
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = recover(str(checkpoint), Path(tmp) / "out", config, progress=False,
                          eval_dataset=None if args.pilot else "wikitext2", eval_windows=args.windows)
            result.update({
                "trainable_params": out["recovery"]["trainable_params"], "lr": args.lr, "steps": args.steps,
                "train_seconds": out["recovery"]["seconds"], "final_loss": out["final_loss"],
                "heldout_loss": out["recovery"].get("heldout_loss"),
                "seconds_per_step": _seconds_per_step(Path(tmp) / "out"),
                "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            })
            if not args.pilot:
                result["wikitext2_perplexity"] = out["eval"]["wikitext2"]["perplexity"]
                result.update(zero_shot(args, *qrecover.load(Path(tmp) / "out")))
        return result
    tokens = qrecover.eval_tokens(tokenizer, "wikitext2")
    result["wikitext2_perplexity"] = qrecover.perplexity(model, tokens, max_windows=args.windows, progress=False)["perplexity"]
    result.update(zero_shot(args, model, tokenizer))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _seconds_per_step(out: Path) -> float:
    log = json.loads((out / "recovery_log.json").read_text())["log"]
    timed = log[1:] or log  # the first step pays for warm-up
    return sum(r["seconds"] for r in timed) / len(timed)


def step_cost(args, launch) -> None:
    """Seconds per step (the first, warm-up step left out) of cross-entropy and of distillation, both
    without noise, in fp32 and bf16, the teacher live or cached (the cache filled before the timed
    steps), same checkpoint, data and batch, in one run."""
    bits = args.bits[0]
    launch(f"before:{bits}")  # quantizes the checkpoint if it is not there yet
    cache = str(Path(args.work) / f"teacher-cache-w{bits}")
    rows = []
    for kind, precision, teacher in (("no-noise", "fp32", None), ("no-noise", "bf16", None), ("kd", "fp32", None),
                                     ("kd", "bf16", None), ("kd", "bf16", cache)):
        r = launch(f"{kind}:{bits}", lr=args.lrs[0], steps=args.step_cost, precision=precision, pilot=True, teacher_cache=teacher)
        rows.append({"run": "cross-entropy" if kind == "no-noise" else "distillation", "precision": precision,
                     "teacher": "-" if kind == "no-noise" else ("cached" if teacher else "live"),
                     "seconds_per_step": r["seconds_per_step"], "final_loss": r["final_loss"]})
    base = rows[0]["seconds_per_step"]
    table = ["| objective | precision | teacher | s / step | ratio to fp32 cross-entropy |", "|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['precision']} | {r['teacher']} | {r['seconds_per_step']:.2f} | {r['seconds_per_step'] / base:.2f} |" for r in rows]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "step_cost": rows}, indent=2) + "\n")
    print("\n".join(table))


def zero_shot(args, model, tokenizer) -> dict:
    """Zero-shot scores of a model when --tasks asks for them (the tasks' mean and each task's score)."""
    if not args.tasks:
        return {}
    import qrecover

    out = qrecover.zeroshot(model, args.tasks.split(","), tokenizer=tokenizer, limit=args.limit)
    return {"zeroshot_mean": out["mean"], "zeroshot": {t: r["score"] for t, r in out["tasks"].items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--salient", default="3%")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and training sequence length")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lrs", type=lambda t: [float(v) for v in t.split(",")], default=[1e-4, 3e-4, 1e-3],
                        help="learning-rate grid of the pilots (one value: no pilots)")
    parser.add_argument("--fixed-lr", action="append", default=[], metavar="METHOD=LR",
                        help="use LR for METHOD without pilots (e.g. chosen by an earlier run's pilots); repeatable")
    parser.add_argument("--pilot-steps", type=int, default=30)
    parser.add_argument("--holdout", type=int, default=48, help="training blocks kept out for choosing the learning rate")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--weights", default="cached", choices=("cached", "unpacked"),
                        help="frozen weights during training: kept dequantized (faster, default) or unpacked at every use; same results")
    parser.add_argument("--tasks", help="zero-shot tasks after each run, comma-separated lm-eval names or NAME=PATH "
                        "(e.g. arc_easy=tests/data/arc-easy-test-100.jsonl,piqa=tests/data/piqa-valid-100.jsonl)")
    parser.add_argument("--limit", type=int, help="zero-shot: only the first N examples of each task")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="training precision of every method")
    parser.add_argument("--step-cost", type=int, metavar="N", help="only time N steps of fp32 cross-entropy and of bf16 "
                        "distillation on the first bit width, in this one run, and print their ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_recover"), help="where the quantized checkpoints are kept")
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench_recover.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--pilot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    def launch(run: str, **overrides) -> dict:
        values = vars(args) | overrides
        passthrough = [a for k, v in values.items() if k not in ("one", "json", "bits", "methods", "lrs", "pilot", "fixed_lr") and v is not None
                       for a in (f"--{k.replace('_', '-')}", str(v))] + (["--pilot"] if values.get("pilot") else [])
        print(f"running {run} {overrides or ''} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--one", run, *passthrough], capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{run} failed")
        result = json.loads(lines[-1][7:])
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    if args.step_cost:
        return step_cost(args, launch)
    fixed = dict(spec.partition("=")[::2] for spec in args.fixed_lr)  # checked before any run starts
    if set(fixed) - set(METHODS):
        parser.error(f"--fixed-lr: unknown methods {sorted(set(fixed) - set(METHODS))}; choose from {', '.join(METHODS)}")
    try:
        fixed = {kind: float(lr) for kind, lr in fixed.items()}
    except ValueError:
        parser.error(f"--fixed-lr takes METHOD=LR, e.g. gift=5e-4; got {args.fixed_lr}")
    results = [launch("full-precision:16")]
    for b in args.bits:
        results.append(launch(f"before:{b}"))
    chosen, pilots = {}, []
    for kind in args.methods:
        if kind in fixed or len(args.lrs) == 1:
            chosen[kind] = fixed.get(kind, args.lrs[0])
            continue
        trials = [launch(f"{kind}:{args.bits[0]}", lr=lr, steps=args.pilot_steps, pilot=True) for lr in args.lrs]
        pilots += trials
        chosen[kind] = min(trials, key=lambda r: r["heldout_loss"]["after"])["lr"]
    for b in args.bits:
        for kind in args.methods:
            results.append(launch(f"{kind}:{b}", lr=chosen[kind]))

    full = results[0]["wikitext2_perplexity"]
    zs = ["zero-shot mean"] if args.tasks else []
    rows = ["| " + " | ".join(["bits", "run", "trainable params", "lr", "train s", "peak MB", "held-out loss", "WikiText-2 ppl", "gap closed", *zs]) + " |",
            "|---" * (9 + len(zs)) + "|"]
    for r in results:
        before = next((b["wikitext2_perplexity"] for b in results if b["run"] == "before" and b["bits"] == r["bits"]), None)
        recovered = r["run"] not in ("before", "full-precision")
        r["gap_closed"] = (before - r["wikitext2_perplexity"]) / (before - full) if recovered else None
        heldout = f"{r['heldout_loss']['after']:.4f}" if "heldout_loss" in r else "-"
        rows.append(
            f"| {r['bits'] or 16} | {r['run']} | {r.get('trainable_params', '-')} | {r.get('lr', '-')} | "
            f"{r.get('train_seconds', '-')} | {r.get('peak_memory_mb', '-')} | {heldout} | "
            f"{r['wikitext2_perplexity']:.2f} | {'' if r['gap_closed'] is None else format(r['gap_closed'], '.0%')} |"
            + (f" {r['zeroshot_mean']:.3f} |" if zs else "")
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "json")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**meta, "chosen_lr": chosen, "pilots": pilots, "results": results}, indent=2) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
