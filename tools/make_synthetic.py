"""Write a LLaMA-shaped model with random weights as sharded safetensors, for memory and speed
measurements at scale without downloads: the real shapes, dtype and file layout of a hub checkpoint
(config.json, model-0000N-of-0000M.safetensors, model.safetensors.index.json), a byte-level BPE
tokenizer trained on the embedded WikiText-2 text, and weights drawn layer by layer (never the whole
model in memory).

    python tools/make_synthetic.py runs/synthetic-7b --shape 7b          # 13.5 GB in bfloat16
    python tools/make_synthetic.py runs/synthetic-1b --shape 1b --dtype float16
    python tools/make_synthetic.py OUT --hidden 256 --layers 4 --intermediate 688 --vocab 4000

Its perplexity means nothing; quantizing it exercises every part of the pipeline at the real size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# LLaMA-2-7B, TinyLlama-1.1B; "tiny" is what the CI test streams.
SHAPES = {
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
    "1b": dict(hidden=2048, layers=22, intermediate=5632, vocab=32000, heads=32, kv_heads=4),
    "tiny": dict(hidden=256, layers=6, intermediate=688, vocab=4000, heads=8, kv_heads=4),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def layer_tensors(i: int, hidden: int, intermediate: int, heads: int, kv_heads: int, dtype, gen) -> dict:
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }
    out = {f"model.layers.{i}.{name}": (torch.randn(shape, generator=gen) * 0.02).to(dtype) for name, shape in shapes.items()}
    for norm, boosted in (("input_layernorm", slice(0, 3)), ("post_attention_layernorm", slice(-2, None))):
        weight = torch.ones(hidden)
        weight[boosted] = 8.0  # a few large input features, as trained LLMs have
        out[f"model.layers.{i}.{norm}.weight"] = weight.to(dtype)
    return out


def train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qrecover.data import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([load_text("default")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def write(out: Path, hidden, layers, intermediate, vocab, heads, kv_heads, dtype, shard_bytes: int, seed: int) -> int:
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    parts = [lambda: {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype)}]
    parts += [lambda i=i: layer_tensors(i, hidden, intermediate, heads, kv_heads, dtype, gen) for i in range(layers)]
    parts += [lambda: {"model.norm.weight": torch.ones(hidden, dtype=dtype),
                       "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype)}]
    shards, pending, total = [], {}, 0  # shards: the tensor names of each file written

    def flush():
        nonlocal pending, total
        shards.append(list(pending))
        save_file(pending, str(out / f"part{len(shards)}.tmp"), metadata={"format": "pt"})
        total += sum(t.nbytes for t in pending.values())
        pending = {}

    for make in parts:
        pending.update(make())
        if sum(t.nbytes for t in pending.values()) >= shard_bytes:
            flush()
    if pending:
        flush()
    weight_map = {}
    for k, names in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part{k}.tmp").replace(out / name)
        weight_map.update({n: name for n in names})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, dtype=str(dtype).removeprefix("torch."))
    config.save_pretrained(out)
    train_tokenizer(min(vocab, 32000)).save_pretrained(out)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the model folder to create (must not exist)")
    p.add_argument("--shape", choices=SHAPES, default="tiny", help="a named shape (default tiny); the options below override it")
    for name in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size in GB (default 5, as the hub's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"make_synthetic: {args.out} exists; choose another folder", file=sys.stderr)
        return 2
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPES[args.shape].items()}
    total = write(args.out, **shape, dtype=DTYPES[args.dtype], shard_bytes=int(args.shard_gb * 2**30), seed=args.seed)
    print(json.dumps({"out": str(args.out), **shape, "dtype": args.dtype, "bytes": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
