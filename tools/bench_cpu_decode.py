"""CPU decode speed: SmolLM2-135M in float32 against a qrecover checkpoint of it, same machine, same run.

Greedy decoding with the KV cache, batch 1: a short prompt is prefilled, then N tokens are decoded one
at a time; tokens/s counts the decode steps only (median of R repeats). "w4-uncached" runs the
checkpoint through torch_ref, which unpacks the packed words on every call: the speed before
the torch backend cached its codes.

    .venv/bin/qrecover quantize smollm2-135m --bits 4 --salient 3% --nsamples 8 --seqlen 256 --out /tmp/smol-w4
    .venv/bin/python tools/bench_cpu_decode.py --checkpoint /tmp/smol-w4

Prints a Markdown table and writes JSON (default runs/bench_cpu_decode.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the city begins in"


def decode_tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Decode steps per second after prefilling ids (greedy, KV cache, batch 1)."""
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return new_tokens / (time.perf_counter() - start)


@contextlib.contextmanager
def uncached_torch_path():
    """Route every QuantLinear through torch_ref (unpack on each call), as before the codes cache."""
    from qrecover import kernels
    from qrecover.kernels import torch_ref

    original = kernels.mixed_linear
    kernels.mixed_linear = torch_ref.forward
    try:
        yield
    finally:
        kernels.mixed_linear = original


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a qrecover checkpoint of SmolLM2-135M (see above)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--uncached-tokens", type=int, default=8, help="decode steps for w4-uncached (it is slow); 0 skips it")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_cpu_decode.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from qrecover import load_checkpoint, load_pretrained, reference_model_dir

    full, tokenizer = load_pretrained(str(reference_model_dir()))
    quantized, _, _ = load_checkpoint(args.checkpoint)
    qc = quantized.config.quantization_config
    label = f"qrecover w{qc['bits']} g{qc['group_size']}"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    runs = [
        ("float32", full, args.new_tokens, contextlib.nullcontext),
        (label, quantized, args.new_tokens, contextlib.nullcontext),
    ]
    if args.uncached_tokens:
        runs.append((f"{label}, uncached (torch_ref)", quantized, args.uncached_tokens, uncached_torch_path))

    rows = []
    for name, model, n, context in runs:
        model.eval()
        with context():
            decode_tokens_per_second(model, ids, 2)  # warm-up: caches, allocator
            speeds = [decode_tokens_per_second(model, ids, n) for _ in range(args.repeats)]
        rows.append({"model": name, "new_tokens": n, "tokens_per_s": statistics.median(speeds), "all_runs": speeds})
        print(f"{name}: {rows[-1]['tokens_per_s']:.2f} tokens/s", flush=True)

    base = rows[0]["tokens_per_s"]
    print(f"\n| model | decode tokens/s | vs float32 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x |")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_average": os.getloadavg(), "torch": torch.__version__},
        "checkpoint": args.checkpoint, "prompt_tokens": ids.shape[1], "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
