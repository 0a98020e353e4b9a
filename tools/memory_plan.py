"""The memory plan of a recipe's recovery (qrecover.recovery.memory) from the model's shapes alone, and
what fits on one 24, 48 and 80 GB GPU: what the big recipes state in their comments.

The model is built on the meta device from a config.json (--config) or from the published shapes of
the recipe's model (SHAPES below); nothing is downloaded.

    python tools/memory_plan.py recipes/llama-2-7b-w4.yaml
    python tools/memory_plan.py recipes/llama-3-70b-w4.yaml --gpus 24 48 80
    python tools/memory_plan.py recipes/smollm2-135m-w4.yaml --config ~/.cache/qrecover/models/SmolLM2-135M-Instruct/config.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Published shapes (the models' config.json on the hub), by the recipe's model id.
SHAPES = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Meta-Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# What a GPU run needs besides the plan: the CUDA context and the caching allocator's slack.
CUDA_OVERHEAD_GB = 1.5


def plan_for(recipe_path: Path, config_path: Path | None, batch_size: int | None = None) -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from qrecover.recipes import load_recipe
    from qrecover.recovery.memory import memory_plan

    recipe = load_recipe(recipe_path)
    if recipe.recover is None:
        raise SystemExit(f"{recipe_path} has no recover section")
    if config_path:
        hf = AutoConfig.from_pretrained(config_path.parent if config_path.is_file() else config_path)
    elif recipe.model in SHAPES:
        hf = LlamaConfig(**SHAPES[recipe.model])
    else:
        raise SystemExit(f"no shapes known for {recipe.model}: pass --config PATH/config.json")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    rc = recipe.recover
    if batch_size:
        rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, batch_size=batch_size))
    gpu = (recipe.device or "cuda").startswith("cuda")
    bf16 = rc.train.precision in ("auto", "bf16") if gpu else rc.train.precision == "bf16"
    live = rc.objective_for(True) != "ce" and not rc.teacher_cache
    return memory_plan(model, rc, recipe.quantize, bf16=bf16, teacher_live=live, weight_bytes=2, on_gpu=gpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--config", type=Path, help="the model's config.json (default: the published shapes of its id)")
    p.add_argument("--gpus", nargs="+", type=float, default=[24, 48, 80], help="GPU memory sizes in GB")
    p.add_argument("--json", type=Path, help="also write the plans here")
    args = p.parse_args()
    from qrecover.recipes import load_recipe

    out = {}
    for path in args.recipes:
        plan = {k: v / 2**30 for k, v in plan_for(path, args.config).items()}
        fits = {f"{g:g} GB": plan["total"] + CUDA_OVERHEAD_GB <= g for g in args.gpus}
        batch = load_recipe(path).recover.train.batch_size
        # Where the recipe's micro-batch does not fit, the largest that does (gradient accumulation
        # keeps the batch): activations shrink with it, the weights do not.
        smaller = {}
        for g, ok in fits.items():
            for b in range(batch - 1, 0, -1):
                if not ok and plan_for(path, args.config, b)["total"] / 2**30 + CUDA_OVERHEAD_GB <= float(g.split()[0]):
                    smaller[g] = b
                    break
        out[str(path)] = {"plan_gb": {k: round(v, 2) for k, v in plan.items()}, "fits_one_gpu": fits,
                          "micro_batch_that_fits": smaller}
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in plan.items() if k != "total" and v >= 0.05)
        verdict = ", ".join(f"{g}: {'fits' if ok else f'batch {smaller[g]} fits' if g in smaller else 'no'}"
                            for g, ok in fits.items())
        print(f"{path.name}: {plan['total']:.1f} GB ({parts}); +{CUDA_OVERHEAD_GB} GB CUDA; {verdict}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
