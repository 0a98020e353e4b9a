import json
from pathlib import Path

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.api import load
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.nn import QuantLinear
from qrecover.pipeline import quantize_model

from conftest import tiny_model


@pytest.fixture
def quantized(tiny_tokenizer):
    model = tiny_model(vocab=len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, salient=5, overrides={"down_proj": {"bits": 4}})
    report = quantize_model(model, ids, cfg, progress=False)
    return model, tiny_tokenizer, cfg, report


def logits(model):
    ids = torch.arange(40).view(2, 20) % 250
    with torch.no_grad():
        return model(ids).logits


def test_load_after_save_gives_identical_logits(quantized, tmp_path):
    model, tok, cfg, report = quantized
    out = save_checkpoint(model, tok, tmp_path / "ckpt", cfg, report=report)
    loaded, tok2, cfg2 = load_checkpoint(out)
    assert cfg2 == cfg
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.model.layers[0].mlp.down_proj.bits == 4 and loaded.model.layers[0].mlp.up_proj.bits == 3
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qrecover" and qc["format_version"] == 1 and qc["salient"]["count"] == 5
    assert qc["salient"]["tau"] == "inf" and qc["checkpoint_format"] == "gptq"
    assert (out / "quantization_report.json").is_file()
    assert not (out / "quantize_config.json").exists(), "a GPTQ tool would silently drop the 16-bit columns"
    # Tensor layout of format v1.
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.qweight").shape == (8, 80)  # 80 codes of 3 bits in 32-bit words
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.salient_idx").tolist() == sorted(f.get_tensor(f"{name}.salient_idx").tolist())
        assert "lm_head.weight" not in keys  # tied to the embeddings


def test_sharded_checkpoint(quantized, tmp_path):
    model, tok, cfg, _ = quantized
    out = save_checkpoint(model, tok, tmp_path / "ckpt", cfg, max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert torch.equal(logits(load(out)[0]), logits(model))


def test_existing_output_needs_overwrite(quantized, tmp_path):
    model, tok, cfg, _ = quantized
    out = save_checkpoint(model, tok, tmp_path / "ckpt", cfg)
    with pytest.raises(QRecoverError, match="exists; choose another or pass --overwrite"):
        save_checkpoint(model, tok, out, cfg)
    save_checkpoint(model, tok, out, cfg, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    model, tok, cfg, _ = quantized
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tok, tmp_path / "ckpt", cfg)
    assert list(tmp_path.iterdir()) == []


def test_plain_gptq_checkpoint_is_marked_for_gptq_tools(tiny_tokenizer, tmp_path):
    model = tiny_model(vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(model, torch.randint(0, 250, (2, 32)), cfg, progress=False)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg)
    compat = json.loads((out / "quantize_config.json").read_text())
    assert compat == {**compat, "bits": 4, "group_size": 32, "quant_method": "gptq", "checkpoint_format": "gptq"}


def test_asymmetric_grids_are_stored_as_gptq_v2_and_older_v1_layers_are_converted(tiny_tokenizer, tmp_path):
    """An asymmetric checkpoint holds raw zeros (GPTQ v2); a layer still in v1 (as an older asymmetric
    checkpoint loads) is written as v2 too, computing the same."""
    from safetensors.torch import load_file

    from qrecover.format import unpack_zeros

    model = tiny_model(vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32, sym=False)
    quantize_model(model, torch.randint(0, 250, (2, 32)), cfg, progress=False)
    expected = logits(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(q.zero_offset == 0 for q in layers)
    zeros = [q.zeros() for q in layers]
    for q in layers[::2]:  # half of them as an older checkpoint stored them: zero - 1
        q.set_zeros(q.zeros(), 1)
    assert torch.equal(logits(model), expected)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", cfg)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    stored = load_file(out / "model.safetensors")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, q, zero in zip(names, layers, zeros):
        assert torch.equal(unpack_zeros(stored[f"{name}.qzeros"], 4, q.out_features, 0), zero), name
    assert torch.equal(logits(load_checkpoint(out)[0]), expected)


def test_refuses_bad_checkpoints(quantized, tmp_path):
    model, tok, cfg, _ = quantized
    out = save_checkpoint(model, tok, tmp_path / "ckpt", cfg)
    config_path = out / "config.json"
    original = config_path.read_text()

    with pytest.raises(QRecoverError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")

    data = json.loads(original)
    data["quantization_config"]["format_version"] = 2
    config_path.write_text(json.dumps(data))
    with pytest.raises(QRecoverError, match="format version 2.*upgrade qrecover"):
        load_checkpoint(out)

    data["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config_path.write_text(json.dumps(data))
    with pytest.raises(QRecoverError, match="not a qrecover checkpoint"):
        load_checkpoint(out)
    config_path.write_text(original)

    weights = out / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(QRecoverError, match="corrupted or truncated"):
        load_checkpoint(out)

    from safetensors.torch import load_file, save_file

    weights.write_bytes(whole)
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.scales"]
    save_file(tensors, weights)
    with pytest.raises(QRecoverError, match=r"model.layers.1.self_attn.k_proj: missing tensors \['scales'\]"):
        load_checkpoint(out)

    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    tensors["model.layers.1.self_attn.k_proj.scales"] = torch.zeros(3, 40, dtype=torch.float16)
    save_file(tensors, weights)
    with pytest.raises(QRecoverError, match="missing.*model.norm.weight"):
        load_checkpoint(out)


def test_settings_an_older_checkpoint_lacks_read_as_their_defaults(quantized, tmp_path):
    """Checkpoints written before method, group_aware, mse_clip, damp and seed were recorded load with
    QuantConfig's defaults for them; the settings the checkpoint has are kept."""
    model, tok, cfg, _ = quantized  # overrides: down_proj at 4 bits, which the packed tensors need
    cfg = QuantConfig(**{**cfg.to_dict(), "sym": False, "damp": 0.05, "mse_clip": False, "seed": 7, "group_aware": False})
    out = save_checkpoint(model, tok, tmp_path / "c", cfg)
    assert load_checkpoint(out)[2] == cfg
    config = json.loads((out / "config.json").read_text())
    for key in ("method", "group_aware", "mse_clip", "damp", "seed"):
        del config["quantization_config"][key]
    (out / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(out)[2] == QuantConfig(bits=3, group_size=32, sym=False, salient=5, overrides=cfg.overrides)


def test_quantized_modules_replace_linears(quantized, tmp_path):
    model, tok, cfg, _ = quantized
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tok, tmp_path / "c", cfg))
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in n for n, m in loaded.named_modules())


def test_a_checkpoint_written_by_the_hand_written_saver_still_loads():
    """tests/data/format-v1-584e628 was saved (with its logits) by commit 584e628, before checkpoint
    I/O went through transformers' save_pretrained/from_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    old = Path(__file__).parent / "data" / "format-v1-584e628"
    expected = load_file(old / "expected_logits.safetensors")
    model, _, config = load_checkpoint(old)
    assert config.bits == 3 and model.model.layers[1].mlp.down_proj.bits == 4
    # The same logits up to float32 summation order (the CPU's kernels differ: 2e-7 on an AMD EPYC);
    # one zero point read off by one moves them by orders of magnitude more.
    with torch.no_grad():
        torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(old)(expected["ids"]).logits, expected["logits"], rtol=0, atol=1e-5)
