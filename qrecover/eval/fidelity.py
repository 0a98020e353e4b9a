"""How close a model's next-token distributions are to a reference model's, on any text.

On the perplexity protocol's windows (the text tokenized once, non-overlapping windows), at every
predicted position: KL(p_reference || p_model), and whether the two models' most likely tokens
agree. Reported: the mean KL, its 99th percentile, top-1 agreement, and both perplexities. llama.cpp's
`perplexity --kl-divergence` reports the same for its quantization types. Unlike zero-shot scores of
a small model, which sit near chance on some tasks, this says directly how much of the reference's
behaviour a compressed model kept.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import QRecoverError
from .perplexity import window_count


@torch.no_grad()
def fidelity(model, reference, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None, progress: bool = True) -> dict:
    """{'kl_mean', 'kl_p99', 'top1_agreement', 'perplexity', 'reference_perplexity', ...} of model against reference on tokens [1, T]."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise QRecoverError(
            f"the model has {model.config.vocab_size} tokens and the reference {reference.config.vocab_size}: "
            "their distributions cannot be compared; use the model it was quantized from as the reference"
        )
    n_windows = window_count(tokens, seqlen, max_windows)
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    start = time.perf_counter()
    kls, agree, nll, ref_nll = [], 0, 0.0, 0.0
    for i in tqdm(range(n_windows), desc="fidelity windows", disable=not progress):
        ids = tokens[:, i * seqlen : (i + 1) * seqlen]
        log_q = F.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits[0, :-1].float().cpu(), -1)
        log_p = F.log_softmax(reference(input_ids=ids.to(ref_device), use_cache=False).logits[0, :-1].float().cpu(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        if not torch.isfinite(kl).all():
            raise QRecoverError(f"the model gives non-finite log-probabilities on window {i}: its weights or activations overflow")
        kls.append(kl)
        agree += int((log_q.argmax(-1) == log_p.argmax(-1)).sum())
        target = ids[0, 1:]
        nll -= float(log_q.gather(-1, target[:, None]).sum())
        ref_nll -= float(log_p.gather(-1, target[:, None]).sum())
    kl = torch.cat(kls).double()
    count = kl.numel()
    return {
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1_agreement": agree / count,
        "perplexity": math.exp(nll / count),
        "reference_perplexity": math.exp(ref_nll / count),
        "windows": n_windows,
        "seqlen": seqlen,
        "tokens": count,
        "seconds": round(time.perf_counter() - start, 2),
    }
