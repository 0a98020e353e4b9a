"""What recovery will hold in memory, part by part, worked out before it starts from the model's
shapes and the settings: printed and saved in the recovery summary, and what the big recipes state
about one 24, 48 and 80 GB GPU (tools/memory_plan.py computes it from a config alone).

Parts (bytes):
    packed weights   the student's low-bit codes, scales, zeros, g_idx and frozen 16-bit columns
    other weights    embeddings, an untied head, norms, in the dtype they are held in
    trainable        the float32 copy of every trained column (and scale factor), its gradient and
                     AdamW's two moments: 16 bytes per trained value
    fixed codes      with scale training, each layer's code - zero as int8 (1 byte per weight)
    dense weight     the one frozen weight unpacked at a time (int64 codes and the float result), or
                     with --cache-weights all of them in float32
    activations      what autograd keeps for backward: per layer the inputs of its projections,
                     norms and attention (all layers; with gradient checkpointing, each layer's input
                     plus one layer's internals), and the vocabulary-wide tensors of the loss
    saved weights    the dense weights autograd keeps for the input gradients (every layer's, or one
                     layer's with gradient checkpointing): measured on the 1B shape, the part the
                     first version of this plan missed (docs/BENCHMARKS.md)
    teacher          live: its weights (the forwards keep nothing); cached on disk: nothing
"""
from __future__ import annotations

import math

from ..config import QuantConfig
from ..format import packed_length
from ..models import quantizable_linears
from ..nn import QuantLinear
from .config import RecoverConfig

GB = 2**30


def _linear_specs(model, qconfig: QuantConfig | None) -> list[dict]:
    """{in, out, bits, groups, salient, bias} of every projection: read off QuantLinears, or (a model
    still to be quantized, e.g. built on the meta device from its config) resolved from qconfig."""
    specs = []
    for name, m in quantizable_linears(model).items():
        base = getattr(m, "base", None) or getattr(m, "base_layer", m)  # a RecoveryLayer's or a LoRA layer's base
        if isinstance(base, QuantLinear):
            specs.append(dict(inp=base.in_features, out=base.out_features, bits=base.bits, groups=base.scales.shape[0],
                              salient=base.n_salient, bias=base.bias is not None))
        elif qconfig is not None:
            spec = qconfig.resolve(name, base.in_features)
            groups = 1 if spec.group_size == -1 else math.ceil(base.in_features / spec.group_size)
            specs.append(dict(inp=base.in_features, out=base.out_features, bits=spec.bits, groups=groups,
                              salient=spec.n_salient, bias=getattr(base, "bias", None) is not None))
        else:  # an ordinary model under GIFT-SW as PEFT: dense frozen weights
            specs.append(dict(inp=base.in_features, out=base.out_features, bits=None, groups=0, salient=0,
                              bias=getattr(base, "bias", None) is not None))
    return specs


def _packed_bytes(s: dict) -> int:
    if s["bits"] is None:
        return 4 * s["inp"] * s["out"]
    words = packed_length(s["inp"], s["bits"]) * s["out"] + s["groups"] * packed_length(s["out"], s["bits"])
    return 4 * words + 2 * s["groups"] * s["out"] + 4 * s["inp"] + 2 * s["salient"] * s["out"] + 4 * s["salient"] + 2 * s["out"] * s["bias"]


def _other_bytes(model, dtype_bytes: int) -> int:
    """Every tensor outside the projections (embeddings, an untied head, norms), floating ones at dtype_bytes."""
    tied = set(getattr(model, "all_tied_weights_keys", {}))
    projections = tuple(name + "." for name in quantizable_linears(model))
    return sum(t.numel() * (dtype_bytes if t.is_floating_point() else t.element_size())
               for name, t in model.state_dict(keep_vars=True).items() if name not in tied and not name.startswith(projections))


def _saved_weight_bytes(config: RecoverConfig, bf16: bool) -> int:
    """Bytes per weight that autograd keeps of the dense weights for backward. Trained scales make the
    weight a graph node: the matmul keeps it in its compute dtype. Frozen weights under Gaussian or
    uniform noise are rebuilt in backward (noise.frozen_matmul): nothing; without noise it keeps W
    as a plain matmul would, in the input's dtype (float32 from the norms). LoRA and full fine-tuning
    keep the matmul's weight operand: a bfloat16 copy under autocast, in float32 the weight itself
    (full: the parameter, no copy; LoRA on a dequantized base: the unpacked weight)."""
    if config.method == "gift" and config.train.scale_lr:
        return 2 if bf16 else 4
    if config.method == "gift":
        return 0 if config.noise != "none" else 4
    if config.method == "lora":
        return 2 if bf16 else 4
    return 2 if bf16 else 0


def memory_plan(model, config: RecoverConfig, qconfig: QuantConfig | None = None, bf16: bool = False,
                teacher_live: bool = True, weight_bytes: int | None = None, on_gpu: bool = False) -> dict:
    """{part: bytes} of a recovery of `model` (a checkpoint as loaded, or a model from its config on
    the meta device with the qconfig it will be quantized with), and "total". bf16: autocast on;
    weight_bytes: of the tensors outside the projections (default: as the model holds them); on_gpu:
    a live teacher is then held in bfloat16 under bf16 (api._teacher_for)."""
    if hasattr(model, "get_base_model"):  # a PeftModel (LoRA recovery)
        model = model.get_base_model()
    train = config.train
    act = 2 if bf16 else 4
    hf = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h, inter, n_layers, vocab = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.vocab_size
    heads = hf.num_attention_heads
    kv = getattr(hf, "head_dim", None) or h // heads
    kv *= getattr(hf, "num_key_value_heads", None) or heads
    specs = _linear_specs(model, qconfig)
    other_dtype = weight_bytes or next((t.element_size() for t in model.parameters() if t.is_floating_point()), 4)

    trained = 0
    if config.method == "gift":
        trained = sum(s["salient"] * s["out"] for s in specs)
        if train.scale_lr:
            trained += sum(s["groups"] * s["out"] for s in specs)
    elif config.method == "lora":
        rank = config.lora_rank or max(1, round(sum(s["salient"] * s["out"] for s in specs) / sum(s["inp"] + s["out"] for s in specs)))
        trained = sum(rank * (s["inp"] + s["out"]) for s in specs)
    else:  # full fine-tuning: every weight
        trained = sum(s["inp"] * s["out"] for s in specs)

    tokens = train.batch_size * config.max_length
    # Per token and layer, what autograd keeps: the inputs of the seven projections (q/k/v share one),
    # two norms (input and their statistics), the attention's q, k, v and output, the MLP's gate,
    # up, activation and product.
    per_layer = tokens * act * (7 * h + 2 * kv + 5 * inter)
    saved = n_layers * tokens * act * h + per_layer if train.gradient_checkpointing else n_layers * per_layer
    # The loss: the student's float32 logits, its log-probabilities and their gradient; a live teacher's
    # logits and probabilities beside them.
    distilled = teacher_live and config.objective_for(True) != "ce"
    loss = tokens * vocab * 4 * (3 + (2 if distilled else 0))
    widest = max(s["inp"] * s["out"] for s in specs)
    weights = sum(s["inp"] * s["out"] for s in specs)  # the dense weights of every projection
    saved_weights = _saved_weight_bytes(config, bf16) * (weights // n_layers if train.gradient_checkpointing else weights)
    held = config.cache_weights and not train.scale_lr and any(s["bits"] for s in specs)

    plan = {
        "packed_weights": sum(_packed_bytes(s) for s in specs),
        "other_weights": _other_bytes(model, other_dtype),
        "trainable": 16 * trained,
        "fixed_codes": weights if config.method == "gift" and train.scale_lr else 0,
        # --cache-weights: every frozen weight dequantized once, in float32; otherwise one at a time.
        "dense_weight": 4 * weights if held else widest * (8 + 4),
        "activations": saved + loss,
        "saved_weights": saved_weights,
        "teacher": 0,
    }
    if distilled:
        teacher_dtype = 2 if bf16 and on_gpu else 4
        plan["teacher"] = weights * teacher_dtype + _other_bytes(model, teacher_dtype)
    plan["total"] = sum(plan.values())
    return plan


def describe(plan: dict) -> str:
    """One line per part, in GB."""
    return "; ".join(f"{k.replace('_', ' ')} {v / GB:.2f} GB" for k, v in plan.items())
