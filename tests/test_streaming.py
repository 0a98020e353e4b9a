"""Streaming quantization: a directory of sharded safetensors is read one decoder layer at a time and
written as shards, with the same tensors as the whole-model path; memory stays below the model's
size; bad shards are named before any work; an interrupted run resumes."""
import errno
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MAIN_JOB, MAIN_JOB_CALIB, ROOT, run_forked, tiny_model
from qrecover.api import quantize
from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.io import load_checkpoint

sys.path.insert(0, str(ROOT / "tools"))
import make_synthetic  # noqa: E402

CONFIG = QuantConfig(bits=4, group_size=32, salient=4)
CALIB = dict(calib="default", nsamples=4, seqlen=64)


def tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "generation_config.json").read_text() == (b / "generation_config.json").read_text()


@pytest.fixture
def sharded_tiny(tmp_path, tiny_tokenizer):
    """The tiny LLaMA (tied head) saved in shards of 100 kB: several layers per shard and shards per layer."""
    path = tmp_path / "sharded"
    tiny_model(vocab=len(tiny_tokenizer), layers=3).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """tools/make_synthetic.py's tiny shape: untied head, 6 layers, float32 shards of 2 MB."""
    path = tmp_path_factory.mktemp("synthetic") / "model"
    make_synthetic.write(path, **make_synthetic.SHAPES["tiny"], dtype=torch.float32, shard_bytes=2 * 2**20, seed=0)
    return path


def test_streamed_and_whole_quantization_write_the_same_checkpoint(sharded_tiny, tmp_path):
    whole = quantize(str(sharded_tiny), tmp_path / "whole", CONFIG, **CALIB, loading="whole", progress=False)
    streamed = quantize(str(sharded_tiny), tmp_path / "streamed", CONFIG, **CALIB, progress=False)  # auto: shards stream
    assert whole["loading"] == "whole" and streamed["loading"] == "stream"
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 2  # a shard per layer, then the embeddings and the final norm
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as transformers does
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        expected = load_checkpoint(tmp_path / "whole")[0](ids).logits
        got = load_checkpoint(tmp_path / "streamed")[0](ids).logits
    assert torch.equal(got, expected)


def test_an_untied_head_and_spilled_activations_change_nothing(synthetic, tmp_path):
    kw = dict(**CALIB, progress=False)
    quantize(str(synthetic), tmp_path / "whole", CONFIG, loading="whole", **kw)
    # 2 kB of activations in memory: every batch goes to disk in the work folder and back.
    report = quantize(str(synthetic), tmp_path / "spilled", CONFIG, activation_memory=2048, **kw)
    assert report["activations_spilled"] > 0
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "spilled")
    assert "lm_head.weight" in json.loads((tmp_path / "spilled" / "model.safetensors.index.json").read_text())["weight_map"]


def _status_mb(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) // 1024


def peak_growth_mb(small: str, model: str, out: str, result: str) -> int:
    """In this process: quantize `small` (imports, tokenized text and allocator warmed up), then
    `model` streamed and whole, each from a reset high-water mark (Linux: /proc/self/clear_refs);
    writes how far each run's peak resident memory rose above where it started (MB)."""
    settings = dict(calib="default", nsamples=4, seqlen=64, progress=False, dtype="float32")
    config = QuantConfig(bits=4, group_size=128)
    quantize(small, out + "-warm", config, loading="stream", **settings)
    growth = {}
    for loading in ("stream", "whole"):
        Path("/proc/self/clear_refs").write_text("5")
        start = _status_mb("VmRSS")
        quantize(model, f"{out}-{loading}", config, loading=loading, **settings)
        growth[loading] = _status_mb("VmHWM") - start
    Path(result).write_text(json.dumps(growth))
    return 0


def test_a_streamed_quantization_holds_a_fraction_of_the_model_in_memory(tmp_path):
    # 24 layers of hidden 512 in float32: 319 MB (the embeddings and head 16 MB); the same tokenizer
    # (vocabulary 4000) for both models, so the warm-up run tokenizes the calibration text for both.
    shape = dict(hidden=512, intermediate=1408, vocab=4000, heads=8, kv_heads=8, dtype=torch.float32, shard_bytes=64 * 2**20)
    make_synthetic.write(tmp_path / "small", layers=1, seed=1, **shape)
    total = make_synthetic.write(tmp_path / "model", layers=24, seed=2, **shape) / 2**20
    args = (str(tmp_path / "small"), str(tmp_path / "model"), str(tmp_path / "q"), str(tmp_path / "growth.json"))
    code, log = run_forked("test_streaming:peak_growth_mb", args, tmp_path / "log")
    assert code == 0, log
    growth = json.loads((tmp_path / "growth.json").read_text())
    print(f"model {total:.0f} MB; peak memory growth: streamed {growth['stream']} MB, whole {growth['whole']} MB")
    assert growth["whole"] > 0.9 * total  # the measure sees a model in memory
    assert growth["stream"] < 0.5 * total, (growth, total)


def test_bad_shards_are_named_before_any_work(sharded_tiny, tmp_path):
    index_path = sharded_tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(set(index["weight_map"].values()))

    def refused(match):
        with pytest.raises(QRecoverError, match=match):
            quantize(str(sharded_tiny), tmp_path / "out", CONFIG, **CALIB, progress=False)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.qrecover-work").exists()

    missing = sharded_tiny / files[1]
    missing.rename(tmp_path / "aside")
    refused(f"names {files[1]}, which is not in .*the download is incomplete")
    (tmp_path / "aside").rename(missing)

    shard = load_file(missing)
    name, value = next(iter(shard.items()))
    save_file({k: v for k, v in shard.items() if k != name}, str(missing), metadata={"format": "pt"})
    refused(f"places {name} in {files[1]}, which does not hold it")
    save_file({**shard, name: torch.zeros(3, 3)}, str(missing), metadata={"format": "pt"})
    refused(rf"{name} is \[3, 3\], the config says \[{', '.join(map(str, value.shape))}\]")

    save_file(shard, str(missing), metadata={"format": "pt"})
    data = missing.read_bytes()
    missing.write_bytes(data[: len(data) - 100])
    refused(f"{files[1]} is corrupted or truncated")


def test_an_interrupted_or_full_disk_streamed_run_resumes_to_the_same_checkpoint(sharded_tiny, tmp_path, monkeypatch):
    import qrecover.pipeline.progress as progress

    quantize(str(sharded_tiny), tmp_path / "reference", CONFIG, **CALIB, progress=False)
    real, calls = progress.save_file, []

    def full_at_the_second_layer(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(progress, "save_file", full_at_the_second_layer)
    with pytest.raises(QRecoverError, match="no space left on the disk"):
        quantize(str(sharded_tiny), tmp_path / "out", CONFIG, **CALIB, progress=False)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.qrecover-work" / "progress.json").read_text())["done"] == 1
    monkeypatch.setattr(progress, "save_file", real)
    report = quantize(str(sharded_tiny), tmp_path / "out", CONFIG, **CALIB, progress=False)
    assert report["resumed"]["layers_done"] == 1 and not (tmp_path / "out.qrecover-work").exists()
    assert_same_checkpoint(tmp_path / "reference", tmp_path / "out")


def test_streaming_what_cannot_stream_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(QRecoverError, match="cannot be streamed"):
        quantize("owner/model-on-the-hub", tmp_path / "o", CONFIG, loading="stream", progress=False)
    with pytest.raises(QRecoverError, match="loading 'lazy' is not one of auto, whole, stream"):
        quantize(str(tiny_model_dir), tmp_path / "o", CONFIG, loading="lazy", progress=False)


def test_smollm2_saved_as_shards_streams_to_the_checkpoint_of_the_whole_model(smollm2_dir, smollm2_main_job, tmp_path):
    """The real model, the README main job's settings: the same tensors bit for bit either way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(smollm2_dir).save_pretrained(sharded, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(sharded)
    report = quantize(str(sharded), tmp_path / "streamed", QuantConfig(**MAIN_JOB), **MAIN_JOB_CALIB, progress=False)
    assert report["loading"] == "stream" and len(list(sharded.glob("model-*.safetensors"))) > 1
    ta, tb = tensors(smollm2_main_job), tensors(tmp_path / "streamed")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    qa = json.loads((smollm2_main_job / "config.json").read_text())["quantization_config"]
    qb = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in qa.items() if k != "source_model"} == {k: v for k, v in qb.items() if k != "source_model"}
