"""Exports load the way their users load them and compute what qrecover computes: a GPTQ base with an
exact LoRA adapter (transformers + peft, GPTQModel's torch kernel), a dense model (transformers
alone, no qrecover), and plain GPTQ with the salient columns rounded in. A real SmolLM2-135M w4
checkpoint with 3% salient columns."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from qrecover.cli import main
from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.eval.perplexity import perplexity
from qrecover.export import VLLM_LORA_RANKS, export, served_rank
from qrecover.api import load
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.models import load_pretrained
from qrecover.pipeline import quantize_model

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Perplexity windows of 2048 tokens in these tests (docs/BENCHMARKS.md: 16). One is enough: every way of
# loading is compared on the same tokens, to 3 significant digits, beside its logits.
WINDOWS = 1


@pytest.fixture(autouse=True, scope="module")
def eager_gptqmodel():
    """GPTQModel's torch kernel wraps its dequantization in torch.compile, which recompiles for every
    layer shape on a CPU (minutes per model); eager execution computes the same values."""
    previous, torch._dynamo.config.disable = torch._dynamo.config.disable, True
    yield
    torch._dynamo.config.disable = previous


def same_to_3_digits(a: float, b: float) -> bool:
    """Equal to 3 significant digits: within half a unit of the third."""
    return abs(a - b) <= 0.5 * 10 ** (math.floor(math.log10(abs(a))) - 2)


@pytest.fixture(scope="module")
def checkpoint(smollm2_w4):
    """w4 g128 with 3% salient columns (shared with test_smollm2). The same exports at w3 run on a tiny
    model with the same partial groups (test_gptqmodel_interop): 3-bit packing does not need SmolLM2."""
    return smollm2_w4[1]


@pytest.fixture(scope="module")
def checkpoint_output(checkpoint, smollm2):
    """What qrecover computes with the checkpoint, once per bit width for every export of it."""
    return ours(checkpoint, smollm2[2])


def ours(path, tokens):
    """(logits of the first 256 tokens, perplexity) of a checkpoint or adapter as qrecover loads it."""
    model, _ = load(path)
    with torch.no_grad():
        logits = model(tokens[:, :256]).logits.float()
    return logits, perplexity(model, tokens, max_windows=WINDOWS, progress=False)["perplexity"]


def load_gptq(folder):
    """A GPTQ checkpoint the way a transformers user loads it (GPTQModel's torch kernel on a CPU)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    # GPTQModel's default CPU kernel refuses K = 576 at group size 128; its torch kernel takes any K.
    # float32 compute: CPUs without float16 arithmetic run a float16 model many times slower.
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=bits, backend="torch")).eval()


def load_base_and_adapter(out):
    """The way a transformers + peft user loads the export."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_gptq(out / "base"), str(out / "adapter")).eval()


def check_same_model(model, expected_logits, expected_ppl, tokens):
    with torch.no_grad():
        logits = model(tokens[:, :256]).logits.float()
    # 16-bit rounding: the export stores its tensors in float16 where qrecover keeps some in float32.
    assert (logits - expected_logits).abs().max() < 0.02 * expected_logits.abs().max()
    ppl = perplexity(model, tokens, max_windows=WINDOWS, progress=False)["perplexity"]
    assert same_to_3_digits(ppl, expected_ppl), (ppl, expected_ppl)
    return ppl


def test_gptq_base_with_lora_adapter_computes_the_checkpoint(checkpoint, checkpoint_output, smollm2, tmp_path):
    _, _, tokens = smollm2
    expected_logits, expected_ppl = checkpoint_output
    out = tmp_path / "export"
    result = export(checkpoint, out, "gptq-lora", progress=False)
    assert result["ranks"] == {32: 30 * 6, 64: 30}  # 17 -> 32 columns; down_proj 46 -> 64

    settings = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == settings["lora_alpha"] == 32 and settings["lora_dropout"] == 0
    assert sorted(settings["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert settings["rank_pattern"] == settings["alpha_pattern"] == {f"model.layers.{i}.mlp.down_proj": 64 for i in range(30)}
    base_config = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    # 576 inputs at g128 leave a partial group, which GPTQ kernels refuse: the base stores g64 (same weights).
    assert base_config == {**base_config, "quant_method": "gptq", "bits": checkpoint_bits(checkpoint), "group_size": 64, "checkpoint_format": "gptq"}
    assert result["group_size"] == 64
    assert (out / "base" / "quantize_config.json").is_file()

    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    q = load_checkpoint(checkpoint)[0].model.layers[3].self_attn.q_proj
    A = adapter["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    B = adapter["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    assert A.dtype == B.dtype == torch.float16 and A.shape == (32, 576) and B.shape == (576, 32)
    assert torch.equal(A[:17].argmax(1), q.salient_idx.long()) and torch.equal(A[:17].sum(1), torch.ones(17, dtype=torch.float16))
    assert not A[17:].any() and not B[:, 17:].any() and torch.equal(B[:, :17], q.salient_weight)

    ppl = check_same_model(load_base_and_adapter(out), expected_logits, expected_ppl, tokens)
    print(f"w{checkpoint_bits(checkpoint)}: qrecover {expected_ppl:.4f}, transformers + peft {ppl:.4f}")


def checkpoint_bits(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]["bits"]


def test_gptqmodel_loads_the_base(checkpoint, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    out = tmp_path / "export"
    export(checkpoint, out, "gptq-lora", progress=False)
    peer = GPTQModel.load(str(out / "base"), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    mine = load_checkpoint(checkpoint)[0]
    for layer in (0, 29):
        theirs = peer.model.layers[layer].mlp.down_proj.dequantize_weight()
        q = mine.model.layers[layer].mlp.down_proj
        assert torch.equal(theirs, q.dequantize_dense(torch.float32).half())
        assert not theirs[q.salient_idx.long()].any()  # the salient columns are the adapter's


def test_dense_export_loads_without_qrecover(checkpoint, checkpoint_output, smollm2, tmp_path):
    _, _, tokens = smollm2
    expected_logits, expected_ppl = checkpoint_output
    out = tmp_path / "dense"
    assert main(["export", str(checkpoint), "--to", "dense", "--out", str(out), "--quiet"]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = tmp_path / "ids.pt"
    torch.save(tokens[:, :256], ids)
    script = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "assert not any(name.startswith('qrecover') for name in sys.modules)\n"
        f"torch.save(model(torch.load({str(ids)!r})).logits.float(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - expected_logits).abs().max() < 0.02 * expected_logits.abs().max()
    check_same_model(load_pretrained(str(out), dtype=torch.float32)[0], expected_logits, expected_ppl, tokens)


def test_plain_gptq_export_rounds_the_columns_and_says_what_it_costs(checkpoint, checkpoint_output, smollm2, tmp_path, capsys):
    _, _, tokens = smollm2
    out = tmp_path / "gptq"
    assert main(["export", str(checkpoint), "--to", "gptq", "--out", str(out), "--eval-windows", str(WINDOWS), "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cost = result["perplexity"]
    assert result["rounded_columns"] == 30 * (6 * 17 + 46) and cost["after"] > cost["before"]
    assert same_to_3_digits(cost["before"], checkpoint_output[1])
    assert same_to_3_digits(perplexity(load_gptq(out), tokens, max_windows=WINDOWS, progress=False)["perplexity"], cost["after"])


def test_a_lora_recovery_exports_its_adapter_and_the_columns(smollm2, smollm2_w4, tmp_path):
    from qrecover.api import recover
    from qrecover.recovery.config import RecoverConfig, TrainConfig

    tokens = smollm2[2]
    lora = tmp_path / "lora"
    config = RecoverConfig(method="lora", objective="ce", lora_rank=8, max_length=64,
                           train=TrainConfig(steps=2, batch_size=1, lr=1e-2, save_every=0))
    recover(str(smollm2_w4[1]), lora, config, progress=False)
    expected_logits, expected_ppl = ours(lora, tokens)

    out = tmp_path / "export"
    # 8 trained + 17 columns -> rank 32; down_proj 8 + 46 -> 64
    assert export(lora, out, "gptq-lora", progress=False)["ranks"] == {32: 30 * 6, 64: 30}
    check_same_model(load_base_and_adapter(out), expected_logits, expected_ppl, tokens)


def test_a_checkpoint_without_columns_exports_the_base_alone(tiny_tokenizer, tmp_path):
    from conftest import tiny_model

    model = tiny_model(hidden=160, intermediate=320, heads=5, kv_heads=1, vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (2, 32)), cfg, progress=False)
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "k0", cfg)
    out = export(checkpoint, tmp_path / "export", "gptq-lora", progress=False)["out"]
    assert sorted(p.name for p in (tmp_path / "export").iterdir() if not p.name.startswith(".")) == ["base"], out


def test_bad_export_input(quantized_tiny, tmp_path, capsys):
    assert served_rank(17, "x") == 32 and served_rank(320, "x") == 320 and served_rank(1, "x") == 1
    with pytest.raises(QRecoverError, match="more than the largest LoRA rank vLLM serves.*--to dense"):
        served_rank(VLLM_LORA_RANKS[-1] + 1, "model.layers.0.mlp.down_proj")

    out = tmp_path / "export"
    out.mkdir()
    assert main(["export", str(quantized_tiny), "--out", str(out)]) == 2
    assert "exists; choose another or pass --overwrite" in capsys.readouterr().err

    config = json.loads((quantized_tiny / "config.json").read_text())
    config["quantization_config"]["format_version"] = 9
    (quantized_tiny / "config.json").write_text(json.dumps(config))
    assert main(["export", str(quantized_tiny), "--out", str(tmp_path / "e2")]) == 2
    assert "format version 9" in capsys.readouterr().err and not (tmp_path / "e2").exists()


def test_an_interrupted_export_leaves_nothing_loadable(quantized_tiny, tmp_path, monkeypatch):
    import qrecover.export

    monkeypatch.setattr(qrecover.export, "_adapter_config", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export(quantized_tiny, tmp_path / "export", "gptq-lora", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q3", "tiny"]


def test_per_module_bit_widths_export_only_dense(tiny_tokenizer, tmp_path):
    from conftest import tiny_model

    model = tiny_model(hidden=160, intermediate=320, heads=5, kv_heads=1, vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32, salient=4, overrides={"down_proj": {"bits": 8}})
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (2, 32)), cfg, progress=False)
    checkpoint = save_checkpoint(model, tiny_tokenizer, tmp_path / "mixed", cfg)
    with pytest.raises(QRecoverError, match="cannot be described by one GPTQ config: export it --to dense"):
        export(checkpoint, tmp_path / "e", "gptq-lora", progress=False)
    out = export(checkpoint, tmp_path / "dense", "dense", progress=False)["out"]
    ids = torch.randint(0, len(tiny_tokenizer), (1, 16))
    with torch.no_grad():
        expected = load_checkpoint(checkpoint)[0](ids).logits
        got = load_pretrained(out, dtype=torch.float32)[0](ids).logits
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
