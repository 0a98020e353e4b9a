"""Recovery benchmark on SmolLM2-135M-Instruct: GIFT-SW against its baselines at the same budget.

For each bit width, qrecover quantizes the model once (g128, 3% salient columns, `gift` metric,
N x L calibration tokens of wikitext2-valid.txt); then, from that same checkpoint and on the same
training text (wikitext2-valid.txt) with the same steps, batch and sequence length:
- gift:     salient columns trained with Gaussian noise of half the quantization step (GIFT-SW);
- no-noise: the same without noise;
- lora:     LoRA adapters on every projection, about as many trainable parameters.
Each run is its own subprocess (peak memory of its own). Reports WikiText-2 test perplexity over
the first W windows of 2048 tokens for full precision, before recovery and after each method,
with trainable parameters, peak memory and wall time. Prints a table and writes JSON.

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

METHODS = {"gift": ("gift", "gaussian"), "no-noise": ("gift", "none"), "lora": ("lora", "none")}


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import qrecover
    from qrecover.jobs import recover
    from qrecover.models import reference_model_dir
    from qrecover.recover import RecoverConfig
    from qrecover.train import TrainConfig

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
        method, noise = METHODS[kind]
        lr = args.lr_lora if method == "lora" else args.lr
        config = RecoverConfig(
            data="wikitext2", method=method, noise=noise, max_length=args.seqlen,
            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, save_every=0, seed=0),
        )
        with tempfile.TemporaryDirectory() as tmp:
            out = recover(str(checkpoint), Path(tmp) / "out", config, progress=False,
                          eval_dataset="wikitext2", eval_windows=args.windows)
        result.update({
            "trainable_params": out["recovery"]["trainable_params"], "lr": lr,
            "train_seconds": out["recovery"]["seconds"], "final_loss": out["final_loss"],
            "wikitext2_perplexity": out["eval"]["wikitext2"]["perplexity"],
            "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
        return result
    tokens = qrecover.eval_tokens(tokenizer, "wikitext2")
    result["wikitext2_perplexity"] = qrecover.perplexity(model, tokens, max_windows=args.windows, progress=False)["perplexity"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--salient", default="3%")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and training sequence length")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the salient-column runs")
    parser.add_argument("--lr-lora", type=float, default=1e-4, help="learning rate of the LoRA runs")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_recover"), help="where the quantized checkpoints are kept")
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench_recover.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    runs = ["full-precision:16"] + [f"{kind}:{b}" for b in args.bits for kind in ["before", *args.methods]]
    results = []
    passthrough = [a for k, v in vars(args).items() if k not in ("one", "json", "bits", "methods") for a in (f"--{k.replace('_', '-')}", str(v))]
    for run in runs:
        print(f"running {run} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--one", run, *passthrough], capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{run} failed")
        results.append(json.loads(lines[-1][7:]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    full = results[0]["wikitext2_perplexity"]
    rows = ["| bits | run | trainable params | lr | train s | peak MB | WikiText-2 ppl | gap closed |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        before = next((b["wikitext2_perplexity"] for b in results if b["run"] == "before" and b["bits"] == r["bits"]), None)
        closed = "" if r["run"] in ("before", "full-precision") else f"{(before - r['wikitext2_perplexity']) / (before - full):.0%}"
        r["gap_closed"] = None if not closed else (before - r["wikitext2_perplexity"]) / (before - full)
        rows.append(
            f"| {r['bits'] or 16} | {r['run']} | {r.get('trainable_params', '-')} | {r.get('lr', '-')} | "
            f"{r.get('train_seconds', '-')} | {r.get('peak_memory_mb', '-')} | {r['wikitext2_perplexity']:.2f} | {closed} |"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "json")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
