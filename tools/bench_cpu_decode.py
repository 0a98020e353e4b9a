"""CPU prefill and decode speed: SmolLM2-135M in float32, a qrecover checkpoint of it, and its
exports (qrecover export), same machine, same run.

For each batch size B: a prompt of P tokens per sequence is prefilled (prefill tokens/s = B * P /
time), then N tokens are decoded greedily with the KV cache (decode tokens/s = B * N / time); the
median of R repeats. With --export DIR (a gptq-lora export) the exported base + adapter runs through
transformers + peft, and the same base without its adapter through transformers with GPTQModel's
torch kernel (the fastest GPTQModel CPU kernel that takes K = 576 at group size 128); --dense DIR adds
a dense export. Every model computes in float32 (a CPU without float16 arithmetic runs float16 models
many times slower; the exports' 16-bit tensors are read as they are stored). "uncached" runs the checkpoint through torch_ref, which unpacks the packed words on
every call: the speed before the torch backend cached its codes.

    .venv/bin/qrecover quantize smollm2-135m --bits 4 --salient 3% --nsamples 8 --seqlen 256 --out /tmp/smol-w4
    .venv/bin/qrecover export /tmp/smol-w4 --out /tmp/smol-w4-gptq-lora
    .venv/bin/qrecover export /tmp/smol-w4 --to dense --out /tmp/smol-w4-dense
    .venv/bin/python tools/bench_cpu_decode.py --checkpoint /tmp/smol-w4 --export /tmp/smol-w4-gptq-lora --dense /tmp/smol-w4-dense

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


def speeds(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of a batch of prompts: greedy, with the KV cache."""
    batch = prompt.shape[0]
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefill = prompt.numel() / (time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return prefill, batch * new_tokens / (time.perf_counter() - start)


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


def load_export(export: Path, adapter: bool):
    """A gptq-lora export as its users load it: transformers (GPTQModel's torch kernel), then peft."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((export / "base" / "config.json").read_text())["quantization_config"]["bits"]
    # GPTQModel's default CPU kernel refuses K = 576 at group size 128; its torch kernel takes any K.
    model = AutoModelForCausalLM.from_pretrained(export / "base", device_map="cpu", dtype=torch.float32,
                                                 quantization_config=GPTQConfig(bits=bits, backend="torch"))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(export / "adapter"))
    return model.eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a qrecover checkpoint of SmolLM2-135M (see above)")
    p.add_argument("--export", help="its gptq-lora export (qrecover export CKPT --out DIR)")
    p.add_argument("--dense", help="its dense export (qrecover export CKPT --to dense --out DIR)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--uncached-tokens", type=int, default=0, help="decode steps for the uncached torch_ref path (slow); 0 skips it")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_cpu_decode.json"))
    args = p.parse_args(argv)

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    torch.set_num_threads(args.threads)
    from qrecover import load, load_pretrained, reference_model_dir
    from qrecover.data import eval_tokens

    full, tokenizer = load_pretrained(str(reference_model_dir()))
    quantized, _ = load(args.checkpoint)
    qc = quantized.config.quantization_config
    label = f"qrecover w{qc['bits']} g{qc['group_size']}"
    runs = [("float32", lambda: full, args.new_tokens, contextlib.nullcontext),
            (f"{label} (qrecover, torch backend)", lambda: quantized, args.new_tokens, contextlib.nullcontext)]
    if args.uncached_tokens:
        runs.append((f"{label}, uncached (torch_ref)", lambda: quantized, args.uncached_tokens, uncached_torch_path))
    if args.export:
        runs.append(("GPTQ base + LoRA adapter (transformers + peft)", lambda: load_export(Path(args.export), True), args.new_tokens, contextlib.nullcontext))
        runs.append(("GPTQ base alone, k = 0 (GPTQModel torch kernel)", lambda: load_export(Path(args.export), False), args.new_tokens, contextlib.nullcontext))
    if args.dense:
        runs.append(("dense export", lambda: load_pretrained(args.dense, dtype=torch.float32)[0], args.new_tokens, contextlib.nullcontext))

    text = eval_tokens(tokenizer, "wikitext2")[0]
    rows = []
    for name, make, n, context in runs:
        model = make().eval()
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            prompt = text[: batch * args.prompt_tokens].view(batch, args.prompt_tokens)
            with context():
                speeds(model, prompt[:, :8], 2)  # warm-up: caches, allocator, compiled kernels
                measured = [speeds(model, prompt, n) for _ in range(args.repeats)]
            rows.append({"model": name, "batch": batch, "new_tokens": n,
                         "prefill_tokens_per_s": statistics.median(m[0] for m in measured),
                         "decode_tokens_per_s": statistics.median(m[1] for m in measured), "all_runs": measured})
            print(f"{name}, batch {batch}: prefill {rows[-1]['prefill_tokens_per_s']:.1f}, decode {rows[-1]['decode_tokens_per_s']:.2f} tokens/s", flush=True)

    base = {r["batch"]: r for r in rows if r["model"] == "float32"}
    print("\n| model | batch | prefill tokens/s | decode tokens/s | decode vs float32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.2f} | "
              f"{r['decode_tokens_per_s'] / base[r['batch']]['decode_tokens_per_s']:.2f}x |")
    ratios = {}
    if args.export:
        for batch in sorted(base):
            pair = {r["model"].split(" (")[0]: r for r in rows if r["batch"] == batch}
            with_adapter, alone = pair["GPTQ base + LoRA adapter"], pair["GPTQ base alone, k = 0"]
            ratios[batch] = {k: with_adapter[k] / alone[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            print(f"batch {batch}: base + adapter / base alone = {ratios[batch]['decode_tokens_per_s']:.2f}x decode, "
                  f"{ratios[batch]['prefill_tokens_per_s']:.2f}x prefill")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_average": os.getloadavg(), "torch": torch.__version__},
        "checkpoint": args.checkpoint, "export": args.export, "dense": args.dense, "prompt_tokens": args.prompt_tokens,
        "rows": rows, "adapter_over_base": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
