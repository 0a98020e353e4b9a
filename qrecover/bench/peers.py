"""The baselines users already know, through the maintained package that implements them:
GPTQ and AWQ from GPTQModel (CPU kernels: BACKEND.TORCH and BACKEND.TORCH_AWQ)."""
from __future__ import annotations

import os
import time

from ..errors import QRecoverError


def awq_group_size(model, wanted: int) -> int:
    """GPTQModel's AWQ needs groups that divide every input width; the largest of wanted, 64, 32 that does."""
    from ..models import quantizable_linears

    widths = {m.in_features for m in quantizable_linears(model).values()}
    for g in (wanted, 64, 32):
        if all(w % g == 0 for w in widths):
            return g
    raise QRecoverError(f"no AWQ group size in ({wanted}, 64, 32) divides the input widths {sorted(widths)}")


def _gptqmodel():
    # GPTQModel's model loader asks its CPU pool for 2 workers and refuses a pool of 1 (7.7.0).
    workers = int(os.environ.get("GPTQMODEL_CPU_WORKERS") or os.cpu_count() or 2)
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, workers))
    import gptqmodel

    return gptqmodel


def peer_quantize(method: str, cmp, bits: int, preset, checkpoint) -> tuple[float, int]:
    """(quantize seconds, group size): quantize with GPTQModel and save the checkpoint."""
    gptqmodel = _gptqmodel()
    from gptqmodel.quantization.config import AWQConfig, QuantizeConfig

    from ..data import calibration_samples
    from ..models import load_pretrained, resolve_model

    where, gguf = resolve_model(cmp.model)
    if gguf:
        raise QRecoverError("GPTQModel needs an ordinary model directory; convert the GGUF file first (qrecover.convert_gguf)")
    reference, tokenizer = load_pretrained(where)
    group_size = cmp.group_size
    if method == "awq":
        group_size = awq_group_size(reference, cmp.group_size)
        config = AWQConfig(bits=bits, group_size=group_size, sym=False)
    else:
        solver = {} if cmp.damp is None else {"damp_percent": cmp.damp}
        config = QuantizeConfig(bits=bits, group_size=group_size, sym=cmp.sym, desc_act=False, **solver)
    del reference
    samples = calibration_samples(tokenizer, cmp.calib, preset.nsamples, preset.seqlen, seed=0)
    calibration = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
    peer = gptqmodel.GPTQModel.load(where, config, device="cpu")
    start = time.perf_counter()
    peer.quantize(calibration, batch_size=1)
    seconds = round(time.perf_counter() - start, 2)
    peer.save(str(checkpoint))
    return seconds, group_size


def load_peer(method: str, checkpoint):
    """(model, tokenizer) of a checkpoint GPTQModel saved, on its CPU kernel for the method."""
    gptqmodel = _gptqmodel()
    from transformers import AutoTokenizer

    backend = gptqmodel.BACKEND.TORCH_AWQ if method == "awq" else gptqmodel.BACKEND.TORCH
    model = gptqmodel.GPTQModel.load(str(checkpoint), backend=backend, device="cpu").model
    return model.eval(), AutoTokenizer.from_pretrained(checkpoint)
