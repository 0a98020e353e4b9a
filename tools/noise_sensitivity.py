"""How much GIFT-SW's training noise degrades a quantized checkpoint: perplexity under noise, per scale.

GIFT-SW trains the salient columns while every frozen weight computes with deq(W_q) + E,
E ~ N(0, (s * Delta / 2)^2). This evaluates the checkpoint the way training sees it (noise on, no
training) for each scale s, over R noise draws, beside the noiseless perplexity evaluation sees.
The gap says how different the trained model is from the one that is used: when the noisy model is
many times worse, training spends its budget on robustness to noise that evaluation never meets.

    .venv/bin/qrecover quantize smollm2-135m --bits 3 --salient 3% --out /tmp/smol-w3
    .venv/bin/python tools/noise_sensitivity.py /tmp/smol-w3 --scales 0,0.25,0.5,1

Prints a Markdown table and writes JSON (default runs/noise_sensitivity.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def noisy_perplexity(model, tokens, scale: float, draws: int, windows: int, kind: str) -> list[float]:
    """Perplexity with training noise of `scale` (0: none), once per draw, each with fresh noise."""
    from qrecover.eval.perplexity import perplexity
    from qrecover.recovery.layer import RecoveryLayer
    from qrecover.recovery.model import finish, salient_modules
    from qrecover.recovery.noise import NoiseClock, NoiseConfig

    clock = NoiseClock(seed=0)
    names = {m: n for n, m in model.named_modules()}
    for i, m in enumerate(salient_modules(model)):
        model.set_submodule(names[m], RecoveryLayer(m, NoiseConfig(kind if scale > 0 else "none", scale), clock, i))
    model.train()  # the layers draw noise in training mode; SmolLM2 has no dropout to switch on
    out = []
    for draw in range(draws if scale > 0 else 1):
        clock.step = draw
        out.append(perplexity(model, tokens, max_windows=windows, progress=False)["perplexity"])
    model.eval()
    finish(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="qrecover checkpoint directory")
    parser.add_argument("--scales", default="0,0.25,0.5,1", help="noise scales s (comma-separated; 1 = GIFT-SW's Delta/2)")
    parser.add_argument("--kind", default="gaussian", choices=("gaussian", "uniform"))
    parser.add_argument("--draws", type=int, default=2, help="noise draws per scale")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of 2048 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(ROOT / "runs" / "noise_sensitivity.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import qrecover
    from qrecover.data import eval_tokens
    from qrecover.nn import hold_dense_weights

    model, tokenizer = qrecover.load(args.checkpoint)
    hold_dense_weights(model, True)  # one dequantization for every draw
    tokens = eval_tokens(tokenizer, "wikitext2")
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        start = time.perf_counter()
        ppls = noisy_perplexity(model, tokens, scale, args.draws, args.windows, args.kind)
        rows.append({"scale": scale, "perplexity": statistics.fmean(ppls), "draws": ppls,
                     "seconds": round(time.perf_counter() - start, 1)})
    base = rows[0]["perplexity"] if rows[0]["scale"] == 0 else None
    print(f"{args.checkpoint}: WikiText-2 test, {args.windows} windows of 2048, {args.kind} noise, {args.draws} draws\n")
    print("| noise scale s | std | perplexity | x noiseless |\n|---|---|---|---|")
    for r in rows:
        ratio = f"{r['perplexity'] / base:.2f}" if base else "-"
        print(f"| {r['scale']:g} | {r['scale'] / 2:g} Delta | {r['perplexity']:.2f} | {ratio} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "checkpoint": args.checkpoint, "kind": args.kind, "windows": args.windows, "threads": args.threads,
        "rows": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
