"""The full-precision teacher of distillation: its logits live or from a cache, and its own text.

Live (no cache): the teacher model stays resident next to the student (two models in memory) and
runs one no-grad forward per micro-batch.

Cached (`teacher_cache` folder): each training example's top-k log-probabilities (float32) and token
ids (int32) are computed once and kept in `teacher_topk.safetensors`, keyed by a digest of the
example's token ids, so a cache can only ever answer for the very text it was computed on. The file
records the teacher's and the tokenizer's digests and k; a cache made by another teacher, tokenizer
or k is refused. The teacher model is loaded only on a cache miss: a rerun, a pilot or a compare
stage over cached text never loads it.

Self-written text (`data: self`): N sequences the teacher samples from its BOS token (temperature,
top-p), stored as a .jsonl of `text` records beside a .json of the settings and the teacher's digest,
and reused by any later run with the same settings.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import QRecoverError
from ..models import cache_dir, load_pretrained, resolve_model
from ..utils import atomic_write_json
from .objective import float32_logits

CACHE_FILE = "teacher_topk.safetensors"


def file_digest(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def example_key(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.to(torch.int32).numpy().tobytes()).hexdigest()


def check_same_vocabulary(teacher_tok, student_tok, teacher: str) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        a, b = len(teacher_tok.get_vocab()), len(student_tok.get_vocab())
        raise QRecoverError(
            f"the teacher {teacher} has another tokenizer than the student ({a} against {b} tokens, or the "
            "same count with other tokens): distillation compares distributions token by token; pass the "
            "model the checkpoint was quantized from as --teacher"
        )


class Teacher:
    """Next-token targets of a teacher model, for batches of training examples."""

    def __init__(self, spec: str, student_tokenizer, device, topk: int = 64, cache: str | Path | None = None,
                 progress: bool = True, dtype=torch.float32):
        self.spec, self.device, self.topk, self.progress, self.dtype = str(spec), torch.device(device), topk, progress, dtype
        where, _ = resolve_model(self.spec)  # a clear error for a teacher that does not exist
        weights = sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []
        # A local teacher is identified by its weights; a hub id by its name.
        self.digest = file_digest(weights + [Path(where) / "config.json"]) if weights else hashlib.sha256(self.spec.encode()).hexdigest()[:16]
        self.student_tokenizer = student_tokenizer
        self.tokenizer_digest = tokenizer_digest(student_tokenizer)
        self._model = None
        self.cache_path = Path(cache) / CACHE_FILE if cache else None
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.added = 0
        if self.cache_path is not None and self.cache_path.is_file():
            self._read_cache()

    @property
    def model(self):
        """The teacher model, loaded on first use (in eval mode, frozen)."""
        if self._model is None:
            model, tokenizer = load_pretrained(self.spec, dtype=self.dtype, device=self.device)
            check_same_vocabulary(tokenizer, self.student_tokenizer, self.spec)
            self._model = model.requires_grad_(False)
        return self._model

    def _meta(self) -> dict:
        return {"format": "1", "teacher": self.digest, "teacher_spec": self.spec, "tokenizer": self.tokenizer_digest, "topk": str(self.topk)}

    def _read_cache(self) -> None:
        with safe_open(str(self.cache_path), framework="pt") as f:
            meta = f.metadata() or {}
            want = self._meta()
            for key, what in (("teacher", "teacher"), ("tokenizer", "tokenizer"), ("topk", "top-k")):
                if meta.get(key) != want[key]:
                    raise QRecoverError(
                        f"the teacher cache {self.cache_path} was made with another {what} ({meta.get(key)!r}, "
                        f"now {want[key]!r}; teacher there: {meta.get('teacher_spec')!r}); give another "
                        "--teacher-cache folder, or delete this one to recompute it"
                    )
            for name in f.keys():
                if name.endswith(".logp"):
                    key = name[: -len(".logp")]
                    self.entries[key] = (f.get_tensor(name), f.get_tensor(key + ".idx"))

    def save(self) -> None:
        """Write the cache (all entries, atomically) if this run added any."""
        if self.cache_path is None or not self.added:
            return
        tensors = {}
        for key, (logp, idx) in self.entries.items():
            tensors[key + ".logp"], tensors[key + ".idx"] = logp, idx
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{CACHE_FILE}.{os.getpid()}")
        save_file(tensors, str(tmp), metadata=self._meta())
        os.replace(tmp, self.cache_path)
        self.added = 0

    @torch.no_grad()
    def _logits(self, batch: dict, bf16: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return float32_logits(self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    def targets(self, batch: dict, bf16: bool = False) -> tuple:
        """(logits,) live, or (top-k log-probs, top-k ids) from the cache, for a batch [B, L]."""
        if self.cache_path is None:
            return (self._logits(batch, bf16),)
        lengths = batch["attention_mask"].sum(1).tolist()
        keys = [example_key(row[:n].cpu()) for row, n in zip(batch["input_ids"], lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        if missing:
            logp = torch.log_softmax(self._logits(batch, bf16), dim=-1)
            top = logp.topk(self.topk, dim=-1)
            for i in missing:
                n = lengths[i]
                self.entries[keys[i]] = (top.values[i, :n].cpu().contiguous(), top.indices[i, :n].to(torch.int32).cpu().contiguous())
            self.added += len(missing)
        B, L = batch["input_ids"].shape
        # Padding positions (outside the loss mask) get a finite uniform target over the first k ids.
        logp = torch.full((B, L, self.topk), -float(torch.log(torch.tensor(float(self.topk)))))
        idx = torch.arange(self.topk, dtype=torch.int32).expand(B, L, -1).clone()
        for i, (k, n) in enumerate(zip(keys, lengths)):
            logp[i, :n], idx[i, :n] = self.entries[k]
        return logp.to(batch["input_ids"].device), idx.to(batch["input_ids"].device)

    def fill(self, examples: list[dict], pad_id: int, batch_size: int = 4) -> None:
        """Compute the cached targets of every example now (a progress bar), then save the cache."""
        from .data import collate

        todo = [e for e in examples if example_key(e["input_ids"]) not in self.entries]
        for i in tqdm(range(0, len(todo), batch_size), desc="teacher logits", disable=not self.progress or not todo):
            batch = collate(todo[i : i + batch_size], pad_id)
            self.targets(batch)
        self.save()

    def release(self) -> None:
        self._model = None

    @torch.no_grad()
    def write_text(self, n: int, length: int, temperature: float, top_p: float, seed: int, folder: Path | None = None) -> Path:
        """A .jsonl of n sequences of up to `length` tokens sampled from the teacher; made once, then reused."""
        tok = self.student_tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise QRecoverError("data 'self' samples from the tokenizer's BOS (or EOS) token, and this tokenizer has neither")
        settings = {"teacher": self.digest, "teacher_spec": self.spec, "samples": n, "length": length,
                    "temperature": temperature, "top_p": top_p, "seed": seed, "start_token": int(start)}
        digest = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "teacher_spec"}, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(folder) if folder else cache_dir() / "self-text"
        path = folder / f"self-{digest}.jsonl"
        if path.is_file():
            return path
        gen = torch.Generator().manual_seed(seed)
        texts, batch = [], 16
        for i in tqdm(range(0, n, batch), desc="teacher writes", disable=not self.progress):
            m = min(batch, n - i)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = self.model.generate(
                input_ids=torch.full((m, 1), start, device=self.device), attention_mask=torch.ones(m, 1, dtype=torch.long, device=self.device),
                do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=length - 1,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
            texts += tok.batch_decode(out[:, 1:], skip_special_tokens=True)
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise QRecoverError(f"the teacher {self.spec} wrote only empty sequences; use another data source")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
        atomic_write_json(path.with_suffix(".json"), {**settings, "sequences": len(texts)})
        os.replace(tmp, path)
        return path
