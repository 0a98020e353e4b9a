"""Perplexity with the standard protocol of the quantization literature (GPTQ, AWQ, QUIK ...).

The evaluation text is tokenized once, cut into non-overlapping windows of seqlen tokens (the
tail shorter than a window is dropped), and the perplexity is exp of the mean next-token negative
log-likelihood over all predicted tokens of all windows.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import QRecoverError


def window_count(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> int:
    """How many whole windows of seqlen tokens the protocol evaluates (at most max_windows)."""
    n_windows = tokens.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise QRecoverError(f"the evaluation text has {tokens.shape[1]} tokens, fewer than one window of {seqlen}")
    return n_windows


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, progress: bool = True,
               bf16: bool = False) -> dict:
    """{'perplexity', 'nll', 'windows', 'tokens', 'seconds', 'precision'} of model on tokens [1, T].

    bf16: the forward under bfloat16 autocast (where the hardware multiplies it: 1.5-3x faster on
    CPUs with AMX), the log-softmax and the sum in float32; it moved SmolLM2-135M's perplexity by
    0.07% over 4 windows (docs/BENCHMARKS.md)."""
    n_windows = window_count(tokens, seqlen, max_windows)
    device = next(model.parameters()).device
    start = time.perf_counter()
    total_nll, count = 0.0, 0
    for i in tqdm(range(n_windows), desc="perplexity windows", disable=not progress):
        ids = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, use_cache=False).logits
        logits = logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise QRecoverError(f"the model gives a non-finite loss on window {i}: its weights or activations overflow")
        total_nll += float(nll)
        count += seqlen - 1
    mean = total_nll / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "windows": n_windows,
        "seqlen": seqlen,
        "tokens": count,
        "seconds": round(time.perf_counter() - start, 2),
        "precision": "bf16" if bf16 else "fp32",
    }
