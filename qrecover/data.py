"""Text for calibration, training and evaluation: named corpora, local files, an embedded default.

A source is a path (.txt, or .jsonl/.json of records), "default" (the calibration corpus shipped
inside the package) or a corpus name. WikiText-2 ships inside the package too (assets/README.md),
so the default calibration, training and evaluation texts work offline; the other corpora come
from the `datasets` hub.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QRecoverError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CORPUS = "wikitext2-valid.txt.xz"


# Corpora shipped in the package: (name, purpose) -> file in ASSETS. WikiText-2's validation split
# stands in for its train split as calibration text (the same text as `default`): the package ships
# no train split, and every result in docs/BENCHMARKS.md calibrated on the validation split.
EMBEDDED = {("wikitext2", "calib"): DEFAULT_CORPUS, ("wikitext2", "eval"): "wikitext2-raw-test.txt.xz"}


@dataclass(frozen=True)
class Corpus:
    """A corpus read from the `datasets` hub."""

    hub: tuple  # positional arguments of datasets.load_dataset
    field: str
    joiner: str
    splits: dict  # purpose ("calib" or "eval") -> hub split
    data_files: dict | None = None


CORPORA = {
    "c4": Corpus(
        ("allenai/c4",), "text", "\n\n", {"calib": "train", "eval": "validation"},
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    "pile": Corpus(("mit-han-lab/pile-val-backup",), "text", "\n\n", {"calib": "validation", "eval": "validation"}),
    "ptb": Corpus(("ptb_text_only", "penn_treebank"), "sentence", " ", {"calib": "train", "eval": "test"}),
}
NAMED = ("wikitext2", *CORPORA)


def embedded_text(name: str) -> str:
    """A text file shipped (xz-compressed) in the package's assets."""
    return lzma.decompress((ASSETS / name).read_bytes()).decode("utf-8").replace("\r\n", "\n")


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise QRecoverError(f"{path} is a binary file, not text: give a UTF-8 .txt, .json or .jsonl file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise QRecoverError(
            f"{path} is not UTF-8 text (byte {e.start}, line {line}: {e.reason}); convert it to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8) or give another file"
        ) from e
    # WikiText files have CRLF line ends; tokenizers must see "\n".
    return text.replace("\r\n", "\n")


def read_records(path: Path) -> list[dict]:
    """The records of a .jsonl file (one JSON object a line) or a .json file (a list of objects)."""
    text = read_text_file(path)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QRecoverError(f"{path} is not valid JSON: {e}") from e
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                records.extend([json.loads(line)] if line.strip() else [])
            except json.JSONDecodeError as e:
                raise QRecoverError(f"{path}, line {number}: not a JSON object ({e.msg} at column {e.colno})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise QRecoverError(f"{path} must hold JSON objects (one a line for .jsonl, a list for .json)")
    return records


def conversation(record: dict, where: str) -> list[dict]:
    """A record as a list of {role, content} messages."""
    if "messages" in record:
        messages = record["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise QRecoverError(f"{where}: every message needs `role` and `content`")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    if "instruction" in record and "output" in record:
        prompt = str(record["instruction"]) + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"])}]
    if "question" in record and "response" in record:
        system = [{"role": "system", "content": str(record["system_prompt"])}] if record.get("system_prompt") else []
        return system + [{"role": "user", "content": str(record["question"])}, {"role": "assistant", "content": str(record["response"])}]
    raise QRecoverError(
        f"{where}: a record has none of the fields qrecover reads: `text`, `messages`, `instruction` + "
        f"`output`, or `question` + `response` (it has {sorted(record)})"
    )


def record_text(record: dict, where: str) -> str:
    """Plain text of one record: its `text`, or its conversation's turns one after another."""
    if "text" in record:
        return str(record["text"])
    return "\n\n".join(m["content"] for m in conversation(record, where))


def _hub_text(name: str, corpus: Corpus, purpose: str) -> str:
    try:
        import datasets

        split = corpus.splits[purpose]
        kwargs = {"data_files": {split: corpus.data_files[split]}} if corpus.data_files else {}
        rows = datasets.load_dataset(*corpus.hub, split=split, **kwargs)[corpus.field]
    except Exception as e:  # offline, missing dataset, unsupported loader script...
        raise QRecoverError(
            f"could not load the {name} corpus from the datasets hub ({type(e).__name__}: {e}); "
            "without a hub, pass a local .txt or .jsonl file, or use the embedded `default`"
        ) from e
    if name == "c4" and purpose == "eval":
        rows = rows[:1100]  # the usual C4 perplexity subset (GPTQ's protocol)
    return corpus.joiner.join(rows)


def load_text(source: str, purpose: str = "calib") -> str:
    """All text of a source; purpose picks the split of a named corpus ("calib" or "eval")."""
    source = str(source)
    if source == "default":
        text = embedded_text(DEFAULT_CORPUS)
    elif (source.lower(), purpose) in EMBEDDED:
        text = embedded_text(EMBEDDED[source.lower(), purpose])
    elif source.lower() in CORPORA:
        text = _hub_text(source.lower(), CORPORA[source.lower()], purpose)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise QRecoverError(
                f"text source {source!r} is neither a file nor one of: default, {', '.join(NAMED)}"
            )
        if path.suffix in (".jsonl", ".json"):
            text = "\n\n".join(record_text(r, str(path)) for r in read_records(path))
        else:
            text = read_text_file(path)
    if not text.strip():
        raise QRecoverError(f"the text of {source!r} is empty")
    return text


def source_label(source: str) -> str:
    """A short name for a text source: the corpus name or the file's stem."""
    return Path(str(source)).stem


# (tokenizer, text) fingerprints -> token ids: a recipe tokenizes the same corpus for calibration,
# training and two evaluations (1.5-2 s each for WikiText-2 on 2 cores); the last few are kept.
_TOKENIZED: dict[tuple, torch.Tensor] = {}
_TOKENIZED_KEEP = 4


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """What decides a fast tokenizer's output (vocabulary, merges, normalizer, special-token
    post-processor), as a digest; None for a tokenizer without a serializable backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{backend.to_str()}".encode()).hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids [T] of a whole text, tokenized once per process and tokenizer."""
    fingerprint = _tokenizer_fingerprint(tokenizer)
    key = fingerprint and (fingerprint, hashlib.sha256(text.encode()).hexdigest())
    if key in _TOKENIZED:
        return _TOKENIZED[key].clone()
    ids = torch.tensor(tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"], dtype=torch.long)
    if key:
        _TOKENIZED[key] = ids.clone()
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
    return ids


def calibration_samples(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples windows [nsamples, seqlen] at seeded random offsets of the source's token stream."""
    if nsamples < 1 or seqlen < 2:
        raise QRecoverError(f"need at least 1 sample of 2 tokens, got {nsamples} x {seqlen}")
    ids = tokenize(tokenizer, load_text(source, "calib"))
    if len(ids) < nsamples * seqlen:
        raise QRecoverError(
            f"the calibration text {source!r} has {len(ids)} tokens, fewer than the {nsamples} x {seqlen} "
            f"= {nsamples * seqlen} requested; use fewer or shorter samples or a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_tokens(tokenizer, source: str) -> torch.Tensor:
    """The evaluation split of a source as one token stream [1, T]."""
    return tokenize(tokenizer, load_text(source, "eval")).unsqueeze(0)
