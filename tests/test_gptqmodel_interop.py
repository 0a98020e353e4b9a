"""A k = 0 checkpoint is an ordinary GPTQ v1 checkpoint: the real peer (GPTQModel, CPU torch kernel)
loads it and computes the same weights and logits."""
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
    "bits, group_size, desc_act",
    [(4, 128, False), (3, 64, True), (2, 32, False), (8, -1, False)],
)
def test_gptqmodel_reads_plain_gptq_checkpoints(bits, group_size, desc_act, tiny_tokenizer, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    # hidden 160 = 128 + 32 and intermediate 320 leave partial groups at g = 128, like SmolLM2's 576.
    model = tiny_model(hidden=160, intermediate=320, heads=5, kv_heads=1, vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (4, 64)), cfg, progress=False)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg)

    peer = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    for name, ours in quantizable_linears(model).items():
        theirs = peer.get_submodule(name).dequantize_weight()
        assert torch.equal(theirs, ours.dequantize_dense(torch.float32).half()), name

    ids = torch.randint(0, len(tiny_tokenizer), (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        got = peer(ids).logits.float()
    assert torch.allclose(got, expected, atol=1e-2), float((got - expected).abs().max())
