"""Checkpoint format v1 through transformers: from_pretrained, generate, pipeline, save_pretrained, lm-eval's hf backend."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

import qrecover  # noqa: F401  (registers the quantizer)
from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.nn import QuantLinear
from qrecover.pipeline import quantize_model

from conftest import PIQA, run_forked, tiny_model

IDS = torch.arange(40).view(2, 20) % 250


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    model = tiny_model(vocab=len(tiny_tokenizer))
    calib = torch.randint(0, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, salient=5, overrides={"down_proj": {"bits": 4}})
    quantize_model(model, calib, cfg, progress=False)
    return save_checkpoint(model, tiny_tokenizer, tmp_path_factory.mktemp("hf") / "ckpt", cfg)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_from_pretrained_gives_the_same_model_as_load_checkpoint(checkpoint):
    ours, _, _ = load_checkpoint(checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint)
    layers = [m for m in theirs.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7 and {m.bits for m in layers} == {3, 4}
    assert theirs.model.layers[1].mlp.down_proj.bits == 4 and theirs.model.layers[1].mlp.up_proj.bits == 3
    assert theirs.is_quantized and theirs.config.quantization_config.to_dict()["format_version"] == 1
    # Same tensors, same dtypes (fp16 scales and salient columns are not cast to the model dtype) ...
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for name, t in theirs_sd.items():
        assert t.dtype == ours_sd[name].dtype and torch.equal(t, ours_sd[name]), name
    # ... so the same logits, bit for bit.
    assert torch.equal(logits(theirs), logits(ours))


def test_generate_and_text_generation_pipeline(checkpoint, tiny_tokenizer):
    ours, _, _ = load_checkpoint(checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint)
    prompt = IDS[:1, :8]
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(theirs.generate(prompt, **greedy), ours.generate(prompt, **greedy))
    text = tiny_tokenizer.decode(IDS[0, :8])
    out = pipeline("text-generation", model=str(checkpoint))(text, **greedy)[0]["generated_text"]
    expected = tiny_tokenizer.decode(ours.generate(tiny_tokenizer(text, return_tensors="pt").input_ids, **greedy)[0])
    assert out == expected and len(out) > len(text)


def test_save_pretrained_writes_a_checkpoint_qrecover_loads(checkpoint, tmp_path):
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint)
    theirs.save_pretrained(tmp_path / "resaved")
    shutil.copy(checkpoint / "tokenizer.json", tmp_path / "resaved")
    shutil.copy(checkpoint / "tokenizer_config.json", tmp_path / "resaved")
    qc = lambda p: json.loads((p / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert qc(tmp_path / "resaved") == qc(checkpoint)
    again, _, _ = load_checkpoint(tmp_path / "resaved")
    assert torch.equal(logits(again), logits(theirs))


def test_refuses_a_future_format_version_and_missing_tensors(checkpoint, tmp_path):
    future = shutil.copytree(checkpoint, tmp_path / "future")
    config = json.loads((future / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (future / "config.json").write_text(json.dumps(config))
    with pytest.raises(QRecoverError, match="format version 2; this qrecover .* reads version 1: upgrade qrecover"):
        AutoModelForCausalLM.from_pretrained(future)

    truncated = shutil.copytree(checkpoint, tmp_path / "truncated")
    tensors = load_file(truncated / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.scales"]
    save_file(tensors, truncated / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QRecoverError, match=r"model.layers.1.self_attn.k_proj: missing tensors \['scales'\]"):
        AutoModelForCausalLM.from_pretrained(truncated)


def lm_eval_command(args: list) -> int:
    """`qrecover-lm-eval ARGS` as its console script runs it (lm-eval reads sys.argv)."""
    from qrecover.eval.lm_eval_cli import main

    sys.argv = ["qrecover-lm-eval", *args]
    return main()


def test_lm_eval_hf_backend_scores_a_checkpoint(checkpoint, tmp_path):
    """`qrecover-lm-eval --model hf --model_args pretrained=CKPT`, offline on lm-eval's own piqa task
    config pointed at a local file (plain `lm_eval` does not import qrecover, so it cannot)."""
    import lm_eval

    standard = Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml"
    rows = PIQA.read_text().splitlines()[:6]
    (tmp_path / "piqa.jsonl").write_text("\n".join(rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa_local.yaml").write_text(
        f"include: {standard}\ntask: piqa_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'piqa.jsonl'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    args = ["--model", "hf", "--model_args", f"pretrained={checkpoint}", "--tasks", "piqa_local",
            "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]
    code, err = run_forked("test_hf_loading:lm_eval_command", (args,), tmp_path / "lm_eval.log")
    assert code == 0, err[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    piqa = json.loads(results.read_text())["results"]["piqa_local"]
    assert 0 <= piqa["acc,none"] <= 1 and 0 <= piqa["acc_norm,none"] <= 1
    assert json.loads(results.read_text())["n-samples"]["piqa_local"]["effective"] == 6
