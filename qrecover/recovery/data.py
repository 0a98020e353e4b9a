"""Training examples for recovery: packed plain text, or instruction and chat data with the loss on
the response tokens only.

Plain text (a .txt file, `default`, a named corpus, or .jsonl records with a `text` field) is
tokenized once and cut into blocks of max_length tokens, all of them labels. Instruction records
(`instruction`, `input`, `output`), chat records (`messages` with roles) and OpenOrca records
(`system_prompt`, `question`, `response`) become conversations rendered with the tokenizer's chat
template (or a plain "### User / ### Assistant" layout when it has none); only tokens inside
assistant turns are labels.

A mixture `a:0.7,b:0.3` takes examples from several sources in those proportions, as many as the
sources allow without repeating any (`self`, the teacher's own text, is one such source).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from ..data import conversation, load_text, read_records, record_text, tokenize
from ..errors import QRecoverError

IGNORE = -100
# Conversational datasets on the hub, as the GIFT-SW paper used them: name -> (path, split).
HUB_CHAT = {"tulu-v2-mix": ("allenai/tulu-v2-sft-mixture", "train"), "openorca": ("Open-Orca/OpenOrca", "train")}


@dataclass
class Examples:
    items: list  # {"input_ids": LongTensor [L], "labels": LongTensor [L]}
    kind: str  # "text" or "chat"
    truncated: int = 0  # conversations cut at max_length
    dropped: int = 0  # conversations with no response token left after the cut


def render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of the assistant turns) of a conversation."""
    if not getattr(tokenizer, "chat_template", None):
        text, spans = "", []
        for m in messages:
            header = f"### {m['role'].capitalize()}:\n"
            body = m["content"] + (tokenizer.eos_token or "") if m["role"] == "assistant" else m["content"]
            text += header
            if m["role"] == "assistant":
                spans.append((len(text), len(text) + len(body)))
            text += body + "\n\n"
        return text, spans
    template = lambda msgs, **kw: tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    text = template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template(messages[:i], add_generation_prompt=True) if i else ""
        through = template(messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise QRecoverError("the tokenizer's chat template renders a conversation differently from its prefixes; cannot find the response tokens")
        spans.append((len(before), len(through)))
    return text, spans


def chat_example(tokenizer, messages: list[dict], max_length: int):
    """({input_ids, labels}, was truncated) for one conversation."""
    text, spans = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = torch.tensor([start for start, _ in enc["offset_mapping"]])
    in_response = torch.zeros(len(ids), dtype=torch.bool)
    for lo, hi in spans:
        in_response |= (starts >= lo) & (starts < hi)
    labels = torch.where(in_response, ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}, len(ids) > max_length


def _hub_records(name: str) -> list[dict]:
    try:
        import datasets

        path, split = HUB_CHAT[name]
        return list(datasets.load_dataset(path, split=split))
    except Exception as e:
        raise QRecoverError(
            f"could not load {name} from the datasets hub ({type(e).__name__}: {e}); pass a local .jsonl file instead"
        ) from e


def load_examples(source: str, tokenizer, max_length: int, limit: int | None = None) -> Examples:
    """Training examples of a source (see the module docstring), at most `limit` of them."""
    if max_length < 2:
        raise QRecoverError(f"max length {max_length} is too short to train on")
    source = str(source)
    if source.lower() in HUB_CHAT:
        return _chat_examples(_hub_records(source.lower()), source, tokenizer, max_length, limit)
    path = Path(source)
    if path.suffix in (".jsonl", ".json") and path.is_file():
        records = read_records(path)
        if not records:
            raise QRecoverError(f"{source} holds no records")
        if "text" not in records[0]:
            return _chat_examples(records, source, tokenizer, max_length, limit)
        text = (tokenizer.eos_token or "\n\n").join(record_text(r, source) for r in records)
    else:
        text = load_text(source, "calib")
    ids = tokenize(tokenizer, text)
    blocks = [ids[i : i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)][:limit]
    if not blocks:
        raise QRecoverError(f"{source} has {len(ids)} tokens, fewer than one block of {max_length}")
    return Examples([{"input_ids": b, "labels": b} for b in blocks], "text")


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """[(source, weight)] of a data spec: one source (weight 1) or a mixture "a:0.7,b:0.3"."""
    spec = str(spec)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 1 and ":" not in spec:
        return [(spec, 1.0)]
    sources = []
    for part in parts:
        source, sep, weight = part.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not source or not value > 0:
            raise QRecoverError(
                f"data mixture {spec!r}: {part!r} is not SOURCE:WEIGHT with a positive weight; "
                "write e.g. default:0.5,self:0.5"
            )
        sources.append((source, value))
    return sources


def mix(parts: list[tuple[Examples, float]], seed: int = 0) -> Examples:
    """Examples drawn from each part in proportion to its weight, none repeated: as many in all as
    the scarcest part (relative to its weight) allows; each part's share a seeded random subset."""
    if len(parts) == 1:
        return parts[0][0]
    total = sum(w for _, w in parts)
    n = min(len(e.items) / (w / total) for e, w in parts)
    gen = torch.Generator().manual_seed(seed)
    items, kinds = [], {e.kind for e, _ in parts}
    for examples, w in parts:
        take = max(1, int(n * w / total))
        chosen = torch.randperm(len(examples.items), generator=gen)[:take].sort().values
        items += [examples.items[i] for i in chosen.tolist()]
    return Examples(
        items, kinds.pop() if len(kinds) == 1 else "mixed",
        sum(e.truncated for e, _ in parts), sum(e.dropped for e, _ in parts),
    )


def _chat_examples(records, source: str, tokenizer, max_length: int, limit) -> Examples:
    examples = Examples([], "chat")
    for i, record in enumerate(records[:limit]):
        example, cut = chat_example(tokenizer, conversation(record, f"{source} record {i}"), max_length)
        examples.truncated += cut
        if (example["labels"] != IGNORE).any():
            examples.items.append(example)
        else:
            examples.dropped += 1
    if not examples.items:
        raise QRecoverError(f"{source} gave no example with a response token within {max_length} tokens")
    return examples


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    def padded(tensors, fill):
        return pad_sequence(tensors, batch_first=True, padding_value=fill)

    return {
        "input_ids": padded([e["input_ids"] for e in examples], pad_id),
        "attention_mask": padded([torch.ones_like(e["input_ids"]) for e in examples], 0),
        "labels": padded([e["labels"] for e in examples], IGNORE),
    }


class BatchOrder:
    """Which examples form micro-batch number p: reshuffled every epoch from the seed, so any
    position can be recomputed (exact resume) and processes can take every world-th batch."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self._perms = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        return self._perms[epoch]

    def indices(self, position: int) -> list[int]:
        start = position * self.batch_size
        return [int(self._perm((start + i) // self.n)[(start + i) % self.n]) for i in range(self.batch_size)]
