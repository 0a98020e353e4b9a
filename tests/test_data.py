import hashlib
import json
import lzma

import pytest
import torch

from qrecover.data import ASSETS, calibration_samples, eval_tokens, load_text, record_text
from qrecover.errors import QRecoverError


def test_default_corpus_is_embedded():
    text = load_text("default")
    assert len(text) > 1_000_000 and "Homarus gammarus" in text


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"line one\r\nline two\r\n")
    assert load_text(str(txt)) == "line one\nline two\n"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        json.dumps({"text": "plain"}) + "\n"
        + json.dumps({"instruction": "Do it", "input": "", "output": "Done"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
        + json.dumps({"instruction": "Add", "input": "2 2", "output": "4"}) + "\n"
        + json.dumps({"system_prompt": "Be brief.", "question": "Why?", "response": "Because."}) + "\n"
    )
    assert load_text(str(jsonl)) == "plain\n\nDo it\n\nDone\n\nhi\n\nhello\n\nAdd\n\n2 2\n\n4\n\nBe brief.\n\nWhy?\n\nBecause."


def test_bad_sources(tmp_path):
    with pytest.raises(QRecoverError, match="neither a file nor one of"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(QRecoverError, match="is empty"):
        load_text(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(QRecoverError, match="broken.jsonl, line 1: not a JSON object"):
        load_text(str(broken))
    with pytest.raises(QRecoverError, match="none of the fields.*'question'"):
        record_text({"question": "?"}, "x.jsonl")


def test_calibration_samples_are_seeded_windows(tiny_tokenizer):
    a = calibration_samples(tiny_tokenizer, "default", 4, 64, seed=1)
    b = calibration_samples(tiny_tokenizer, "default", 4, 64, seed=1)
    c = calibration_samples(tiny_tokenizer, "default", 4, 64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_text_too_short(tiny_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    with pytest.raises(QRecoverError, match=r"fewer than the 8 x 512 = 4096 requested"):
        calibration_samples(tiny_tokenizer, str(short), 8, 512)


def test_wikitext2_is_embedded_byte_for_byte(tiny_tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("wikitext2 must not reach the hub"))
    # SHA-256 of the released files (qrecover/assets/README.md); the texts read have "\n" line ends.
    for purpose, name, digest in [
        ("eval", "wikitext2-raw-test.txt.xz", "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
        ("calib", "wikitext2-valid.txt.xz", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    ]:
        released = lzma.decompress((ASSETS / name).read_bytes())
        assert hashlib.sha256(released).hexdigest() == digest
        assert load_text("wikitext2", purpose) == released.decode().replace("\r\n", "\n")
    assert load_text("wikitext2", "eval").startswith(" = Robert Boulter = \n")
    assert load_text("wikitext2", "calib") == load_text("default")
    assert eval_tokens(tiny_tokenizer, "wikitext2").shape[0] == 1


def test_hub_failure_is_explained(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(QRecoverError, match="could not load the c4 corpus.*embedded `default`"):
        load_text("c4")


def test_a_text_is_tokenized_once_per_tokenizer(tiny_tokenizer, tmp_path, monkeypatch):
    import copy

    import qrecover.data as data

    calls = []
    real = type(tiny_tokenizer).__call__
    monkeypatch.setattr(type(tiny_tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    text = "The same text, tokenized for calibration, training and evaluation." * 50
    first = data.tokenize(tiny_tokenizer, text)
    first[0] = -1  # a caller's change never reaches the cache
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = data.tokenize(AutoTokenizer.from_pretrained(tmp_path / "tok"), text)  # another object, the same tokenizer
    assert len(calls) == 1 and again[0] != -1 and torch.equal(again[1:], first[1:])
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["tokenized"])  # another tokenizer: tokenized anew, with its own ids
    assert len(data.tokenize(other, text)) < len(again) and len(calls) == 2
