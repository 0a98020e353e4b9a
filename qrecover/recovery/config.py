"""Recovery settings: what to train (method, columns), against what (objective, teacher, data), with
which noise, and how (the training loop). Validated here, mapped 1:1 onto recipes' `recover:`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..config import check_bits, check_choice, parse_salient
from ..errors import QRecoverError
from ..saliency import METRICS
from ..utils import native_bf16

METHODS = ("gift", "lora", "full")
NOISE_KINDS = ("gaussian", "uniform", "none")
# kd: KL(teacher || student) at every position; ce: next-token cross-entropy on the data; kd+ce: a mix.
# auto: kd for a quantized checkpoint (the teacher is the model it came from), ce for an ordinary model.
OBJECTIVES = ("auto", "kd", "ce", "kd+ce")
PRECISIONS = ("auto", "fp32", "bf16")
NOISE_PILOT_SCALES = (0.0, 0.125, 0.25, 0.5, 1.0)


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    # > 0: a quantized checkpoint's group scales train too (their integer codes stay), as a factor per
    # scale with this learning rate: about its relative change per step. 0: the scales stay frozen.
    scale_lr: float = 0.0
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of the steps
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # bf16: forwards and backwards under bfloat16 autocast; the trained columns, the optimizer, the
    # softmaxes and the losses stay float32. auto: bf16 where the hardware multiplies bfloat16 (CUDA, a
    # CPU with AMX or AVX512-BF16), fp32 elsewhere (emulated bf16 ran a step 70x slower on AVX2).
    precision: str = "auto"
    save_every: int = 50  # steps between resumable checkpoints (0: none)
    seed: int = 0
    explode_factor: float = 10.0  # stop when a loss exceeds this times the mean of the first steps

    def bf16_on(self, device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and native_bf16(device))

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise QRecoverError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise QRecoverError(f"learning rate {self.lr} must be positive")
        if not self.scale_lr >= 0:
            raise QRecoverError(f"scale learning rate {self.scale_lr} must be >= 0 (0: frozen scales)")
        if not 0 <= self.warmup < 1:
            raise QRecoverError(f"warm-up fraction {self.warmup} must be in [0, 1)")
        check_choice(self.precision, PRECISIONS, "precision")


@dataclass
class RecoverConfig:
    # Training text or conversations (see data.py); "self" is text the teacher writes, and
    # "a:0.7,b:0.3" mixes sources by weight.
    data: str = "default"
    method: str = "gift"
    objective: str = "auto"
    kd_weight: float = 0.5  # kd+ce: loss = kd_weight * KL + (1 - kd_weight) * CE
    teacher: str | None = None  # default: the model the checkpoint was quantized from
    teacher_cache: str | None = None  # folder of the teacher's top-k logits, computed once
    teacher_topk: int = 64
    # data "self": how many sequences the teacher writes, and how
    self_samples: int = 64
    self_temperature: float = 1.0
    self_top_p: float = 0.95
    noise: str = "none"  # GIFT-SW's own: gaussian (docs/BENCHMARKS.md: it costs on SmolLM2 at w3/w2)
    noise_scale: float | str = 1.0  # or "auto": short pilots over NOISE_PILOT_SCALES, scored held out
    noise_bits: int | None = None  # fixed noise bit width; default: the layer's own grid (4 for unquantized)
    pilot_steps: int = 10  # steps of each noise-scale pilot
    max_length: int = 512
    holdout: int = 0  # examples kept out of training to measure a held-out loss before and after
    # Keep each quantized layer's dequantized weight during training instead of unpacking it in every
    # forward and backward: faster steps for a float32 copy of the quantized weights in memory.
    cache_weights: bool = False
    train_norms: bool = False
    lora_rank: int | None = None  # default: about as many parameters as the salient columns
    # Unquantized models only: which columns to train.
    salient: int | float = 128
    metric: str = "gift"
    saliency_batches: int = 4
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        check_choice(self.method, METHODS, "method")
        check_choice(self.objective, OBJECTIVES, "objective")
        if not 0 < self.kd_weight < 1:
            raise QRecoverError(f"kd weight {self.kd_weight} must be in (0, 1): the share of the KL term in kd+ce")
        if self.teacher_topk < 1:
            raise QRecoverError(f"teacher top-k {self.teacher_topk} must be at least 1")
        if self.self_samples < 1:
            raise QRecoverError(f"self samples = {self.self_samples}: the teacher must write at least 1 sequence for data 'self'")
        if not self.self_temperature > 0 or not 0 < self.self_top_p <= 1:
            raise QRecoverError(f"sampling needs temperature > 0 and top-p in (0, 1], got {self.self_temperature} and {self.self_top_p}")
        check_choice(self.noise, NOISE_KINDS, "noise")
        if self.train.scale_lr and (self.method != "gift" or self.noise != "none"):
            raise QRecoverError("--scale-lr trains the scales beside the salient columns: use --method gift --noise none "
                                "(GIFT-SW's noise is defined on frozen weights)")
        if self.noise_scale != "auto":
            try:
                self.noise_scale = float(self.noise_scale)
            except (TypeError, ValueError):
                raise QRecoverError(f"noise scale {self.noise_scale!r} is neither a number nor 'auto'") from None
            if self.noise_scale < 0:
                raise QRecoverError(f"noise scale {self.noise_scale} must be >= 0")
        if self.pilot_steps < 1:
            raise QRecoverError(f"pilot steps {self.pilot_steps} must be at least 1")
        if self.noise_bits is not None:
            check_bits(self.noise_bits, "noise bits")
        check_choice(self.metric, METRICS, "metric")
        self.salient = parse_salient(self.salient)

    def objective_for(self, quantized: bool) -> str:
        """The objective actually trained: `auto` is kd for quantized checkpoints, ce otherwise."""
        if self.objective != "auto":
            return self.objective
        return "kd" if quantized else "ce"

    def to_dict(self) -> dict:
        return asdict(self)
