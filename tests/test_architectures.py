"""Every family in the architecture table, as a tiny random model built from its transformers
config: quantized through the table's linears, saved and loaded back, and (for the families with
sliding-window layers) fed each layer's own masks and rotary tables."""
from __future__ import annotations

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.models import ARCHITECTURES, architecture, quantizable_linears
from qrecover.nn import QuantLinear
from qrecover.pipeline import capture_inputs, quantize_model

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256,
             bos_token_id=0, eos_token_id=1, pad_token_id=1)
# Sliding windows shorter than the samples, so sliding and full layers see different masks.
SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, **SLIDING}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", SLIDING),
    "gemma3_text": ("Gemma3TextConfig", SLIDING),
    "phi3": ("Phi3Config", {}),
}


def tiny(family: str, config_class: str, extra: dict):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SIZES, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.config.model_type == family
    return model


def samples(n=4, seqlen=24):
    return torch.randint(2, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) == set(ARCHITECTURES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantizes_saves_and_loads(family, tmp_path, tiny_tokenizer):
    model = tiny(family, *FAMILIES[family])
    ids = samples()
    with torch.no_grad():
        before = model(ids).logits
    cfg = QuantConfig(bits=4, group_size=32, salient=2)
    report = quantize_model(model, ids, cfg, batch_size=2, progress=False)
    linears = quantizable_linears(model)
    assert len(linears) == 2 * len(architecture(model).linear_names)
    assert all(isinstance(m, QuantLinear) and m.n_salient == 2 for m in linears.values())
    assert [m["module"] for layer in report["layers"] for m in layer["modules"]] == list(linears)
    with torch.no_grad():
        after = model(ids).logits
    # 4 bits keep a random model's logits close: a wrong layer input (mask, rotary) would not.
    assert (after - before).norm() < 0.35 * before.norm()

    loaded, _, _ = load_checkpoint(save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, after, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "gemma3_text"])
def test_each_layer_gets_its_own_mask_and_rotary_tables(family):
    """What the driver feeds layer i is what the model itself passes layer i."""
    model = tiny(family, *FAMILIES[family])
    ids = samples(n=1)
    passed = []
    layers = model.get_submodule(architecture(model).layers)
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: passed.append(k), with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    _, captured = capture_inputs(model, ids, "cpu", 1)
    assert len(captured) == len(passed) == len(layers)
    masks = []
    for mine, theirs in zip(captured, passed):
        for key in ("attention_mask", "position_embeddings"):
            a, b = mine.get(key), theirs.get(key)
            a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
            assert all(same(x, y) for x, y in zip(a, b)), key
        masks.append(mine.get("attention_mask"))
    if family != "mistral":  # mistral puts every layer in its sliding window
        assert not same(*masks)


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("config_class, family", [("MixtralConfig", "mixtral"), ("Qwen3MoeConfig", "qwen3_moe")])
def test_fused_experts_are_refused_with_the_reason(config_class, family):
    import transformers

    extra = {"num_local_experts": 4} if family == "mixtral" else {"num_experts": 4, "moe_intermediate_size": 32}
    config = getattr(transformers, config_class)(**SIZES, num_experts_per_tok=2, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(QRecoverError, match=f"unsupported architecture '{family}'.*fused 3-D.*qrecover quantizes llama, mistral"):
        architecture(model)


def test_a_known_family_laid_out_differently_is_refused():
    model = tiny("llama", "LlamaConfig", {})
    del model.model.layers[1].mlp.gate_proj
    with pytest.raises(QRecoverError, match=r"lacks model.layers.1.mlp.gate_proj"):
        architecture(model)
