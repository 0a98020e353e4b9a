"""Quantization benchmark: qrecover vs GPTQModel on SmolLM2-135M-Instruct, same machine, same run.

Every configuration runs in its own subprocess (so peak memory is its own), computes in the same
dtype (bfloat16 by default, GPTQModel's choice on CPU), quantizes with the same calibration tokens
(N samples x L tokens from wikitext2-valid.txt), and reports the wall time of the quantization
alone, the peak resident memory up to the end of quantization, and WikiText-2 test perplexity over
the first W windows of 2048 tokens.

    .venv/bin/python tools/bench_quantize.py                 # the full table (about 30 minutes on 2 cores)
    .venv/bin/python tools/bench_quantize.py --only qrecover-w4 gptqmodel-w4 --windows 4

Prints a Markdown table and writes JSON (default runs/bench_quantize.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (tool, bits, salient budget)
CONFIGS = {
    "full-precision": ("none", 16, 0),
    "qrecover-w4": ("qrecover", 4, 0),
    "gptqmodel-w4": ("gptqmodel", 4, 0),
    "qrecover-w4-s3%": ("qrecover", 4, "3%"),
    "qrecover-w3": ("qrecover", 3, 0),
    "gptqmodel-w3": ("gptqmodel", 3, 0),
    "qrecover-w3-s3%": ("qrecover", 3, "3%"),
    "qrecover-w2": ("qrecover", 2, 0),
    "gptqmodel-w2": ("gptqmodel", 2, 0),
    "qrecover-w2-s3%": ("qrecover", 2, "3%"),
}


def run_one(name: str, args) -> dict:
    """Quantize (or not) and evaluate one configuration in this process."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from qrecover import QuantConfig, calibration_samples, eval_tokens, load_pretrained, perplexity, quantize_model
    from qrecover.models import reference_model_dir

    tool, bits, salient = CONFIGS[name]
    model_dir = str(reference_model_dir())
    model, tokenizer = load_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    samples = calibration_samples(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    tokens = eval_tokens(tokenizer, "wikitext2")
    result = {"name": name, "tool": tool, "bits": bits, "salient": salient, "group_size": args.group_size}

    if tool == "qrecover":
        cfg = QuantConfig(bits=bits, group_size=args.group_size, sym=True, salient=salient, metric="gift")
        start = time.perf_counter()
        quantize_model(model, samples, cfg, device="cpu", progress=False)
        result["quantize_seconds"] = round(time.perf_counter() - start, 2)
    elif tool == "gptqmodel":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
        from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

        del model
        calibration = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
        peer = GPTQModel.load(model_dir, QuantizeConfig(bits=bits, group_size=args.group_size, sym=True, desc_act=False), device="cpu")
        start = time.perf_counter()
        peer.quantize(calibration, batch_size=1)
        result["quantize_seconds"] = round(time.perf_counter() - start, 2)
        with tempfile.TemporaryDirectory() as tmp:
            peer.save(tmp)
            del peer
            model = GPTQModel.load(tmp, backend=BACKEND.TORCH, device="cpu").model
    result["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["eval_dtype"] = str(next(model.parameters()).dtype)
    result.update({f"wikitext2_{k}": v for k, v in perplexity(model, tokens, max_windows=args.windows, progress=False).items()})
    return result


def table(results: list[dict]) -> str:
    rows = ["| configuration | bits | salient | quantize s | peak MB | WikiText-2 ppl |", "|---|---|---|---|---|---|"]
    for r in results:
        seconds = r.get("quantize_seconds", "-")
        rows.append(
            f"| {r['name']} | {r['bits']} | {r['salient']} | {seconds} | {r['peak_memory_mb']} | {r['wikitext2_perplexity']:.2f} |"
        )
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="configurations to run (default all)")
    parser.add_argument("--calib", default="wikitext2", help="calibration source (default wikitext2: the shared validation split)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 2048 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"],
        help="dtype qrecover loads the model in (default bfloat16: what GPTQModel computes in on CPU)",
    )
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench_quantize.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration here
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return

    results = []
    for name in args.only or list(CONFIGS):
        cmd = [sys.executable, __file__, "--one", name] + [
            a for k, v in vars(args).items() if k not in ("one", "only", "json") for a in (f"--{k.replace('_', '-')}", str(v))
        ]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    by_name = {r["name"]: r for r in results}
    ratios = {}
    for bits in (4, 3, 2):
        ours, peer = by_name.get(f"qrecover-w{bits}"), by_name.get(f"gptqmodel-w{bits}")
        if ours and peer:
            ratios[f"w{bits}_time_ratio"] = round(ours["quantize_seconds"] / peer["quantize_seconds"], 3)
            ratios[f"w{bits}_memory_ratio"] = round(ours["peak_memory_mb"] / peer["peak_memory_mb"], 3)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "json")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**meta, "results": results, "ratios": ratios}, indent=2) + "\n")
    print(table(results))
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
