"""A k = 0 checkpoint is an ordinary GPTQ checkpoint (v1 when symmetric, v2 when asymmetric): the real
peer (GPTQModel, CPU torch kernel) loads it and computes the same weights and logits. An export loads
with a plain from_pretrained (+ peft for the columns), whatever its layers' input sizes."""
import json
import os

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.io import save_checkpoint
from qrecover.models import quantizable_linears
from qrecover.pipeline import quantize_model

from conftest import tiny_model

pytestmark = pytest.mark.slow  # GPTQModel's loader and kernels

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.mark.parametrize(
    "bits, group_size, desc_act, sym",
    [(4, 128, False, True), (4, 128, False, False), (3, 64, True, True), (2, 32, False, True), (8, -1, False, True)],
)
def test_gptqmodel_reads_plain_gptq_checkpoints(bits, group_size, desc_act, sym, tiny_tokenizer, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    # hidden 160 = 128 + 32 and intermediate 320 leave partial groups at g = 128, like SmolLM2's 576.
    model = tiny_model(hidden=160, intermediate=320, heads=5, kv_heads=1, vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (4, 64)), cfg, progress=False)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg)
    stored = json.loads((out / "quantize_config.json").read_text())["checkpoint_format"]
    assert stored == ("gptq" if sym else "gptq_v2")  # GPTQModel refuses asymmetric v1 files it did not write

    peer = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    for name, ours in quantizable_linears(model).items():
        theirs = peer.get_submodule(name).dequantize_weight()
        assert torch.equal(theirs, ours.dequantize_dense(torch.float32).half()), name

    ids = torch.randint(0, len(tiny_tokenizer), (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        got = peer(ids).logits.float()
    assert torch.allclose(got, expected, atol=1e-2), float((got - expected).abs().max())


# w3 with columns: the 3-bit base and its adapter (the SmolLM2 export tests run w4).
@pytest.mark.parametrize("bits, sym, salient", [(4, False, 0), (4, True, 6), (3, True, 6)])
def test_an_export_loads_with_a_plain_from_pretrained(bits, sym, salient, tiny_tokenizer, tmp_path):
    """No quantization_config argument, no backend: GPTQModel's default CPU kernel refuses a partial
    group (160 inputs at g128), so the export stores g32 groups (the same weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qrecover.export import export

    model = tiny_model(hidden=160, intermediate=320, heads=5, kv_heads=1, vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=bits, group_size=128, sym=sym, salient=salient)
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (4, 64)), cfg, progress=False)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg)
    result = export(out, tmp_path / "export", "gptq-lora", progress=False)
    assert result["group_size"] == 32
    stored = json.loads((tmp_path / "export" / "base" / "config.json").read_text())["quantization_config"]
    assert stored["group_size"] == 32 and stored["checkpoint_format"] == ("gptq" if sym else "gptq_v2")

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "base")
    if salient:
        served = PeftModel.from_pretrained(served, str(tmp_path / "export" / "adapter"))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        got = served.eval()(ids).logits.float()
    assert torch.allclose(got, expected, atol=2e-2), float((got - expected).abs().max())
