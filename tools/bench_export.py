"""Does every export compute what the checkpoint computes? WikiText-2 perplexity of a checkpoint as
qrecover loads it and of each of its exports as their users load them, same windows, same run.

    .venv/bin/qrecover quantize smollm2-135m --bits 4 --salient 3% --nsamples 8 --seqlen 256 --out /tmp/smol-w4
    .venv/bin/python tools/bench_export.py --checkpoint /tmp/smol-w4 --windows 16

Exports go to --work (default runs/bench_export/<checkpoint name>). gptq-lora is loaded through
transformers + peft with GPTQModel's torch kernel, dense through transformers, gptq (salient columns
rounded into the grid) through transformers with the same kernel; all compute in float32 (CPUs without
float16 arithmetic run float16 models many times slower), from the exports' 16-bit tensors. Prints a
Markdown table and writes JSON (default runs/bench_export.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def three_digits(a: float, b: float) -> bool:
    return abs(a - b) <= 0.5 * 10 ** (math.floor(math.log10(abs(a))) - 2)


def gptq_model(base: Path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((base / "config.json").read_text())["quantization_config"]["bits"]
    # GPTQModel's default CPU kernel refuses K = 576 at group size 128; its torch kernel takes any K.
    return AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=bits, backend="torch"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="of the exports' 16-bit tensors (Gemma's activations overflow float16)")
    p.add_argument("--work", help="folder for the exports")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_export.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    from qrecover import load, load_pretrained
    from qrecover.data import eval_tokens
    from qrecover.eval.perplexity import perplexity
    from qrecover.export import export

    checkpoint = Path(args.checkpoint)
    work = Path(args.work or ROOT / "runs" / "bench_export" / checkpoint.name)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(checkpoint)
    tokens = eval_tokens(tokenizer, "wikitext2")

    def measure(name, make):
        start = time.perf_counter()
        ppl = perplexity(make().eval(), tokens, max_windows=args.windows, progress=False)["perplexity"]
        rows.append({"model": name, "perplexity": ppl, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name}: {ppl:.4f}", flush=True)

    rows = []
    measure("qrecover (its own loading)", lambda: model)
    exports = {to: work / to for to in ("gptq-lora", "dense", "gptq")}
    for to, out in exports.items():
        export(checkpoint, out, to, overwrite=out.exists(), eval_dataset=None, progress=False, dtype=getattr(torch, args.dtype))
    lora = exports["gptq-lora"]
    if (lora / "adapter").is_dir():
        measure("gptq-lora: base + adapter (transformers + peft)", lambda: PeftModel.from_pretrained(gptq_model(lora / "base"), str(lora / "adapter")))
    else:  # no salient columns: the base alone
        measure("gptq-lora: base, no columns to adapt (transformers)", lambda: gptq_model(lora / "base"))
    measure(f"dense, stored in {args.dtype} (transformers)", lambda: load_pretrained(str(exports["dense"]), dtype=torch.float32)[0])
    if (lora / "adapter").is_dir():  # otherwise the same file as gptq-lora's base
        measure("gptq, columns rounded into the grid (transformers)", lambda: gptq_model(exports["gptq"]))

    own = rows[0]["perplexity"]
    print("\n| model | WikiText-2 perplexity | same to 3 digits as qrecover |\n|---|---|---|")
    for r in rows:
        r["same_3_digits"] = three_digits(r["perplexity"], own)
        print(f"| {r['model']} | {r['perplexity']:.3f} | {'yes' if r['same_3_digits'] else 'no'} |")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(checkpoint), "windows": args.windows, "threads": args.threads, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
