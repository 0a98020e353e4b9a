"""What recovery minimizes: distillation from the full-precision teacher, cross-entropy, or a mix.

kd:    the mean over every real position of KL(p_teacher || p_student), the next-token
       distributions of the model the checkpoint came from and of the checkpoint. It pulls the
       student back to the teacher's behaviour on any text, instead of fitting the text.
ce:    next-token cross-entropy on the labels (response tokens only for chat data).
kd+ce: kd_weight * kd + (1 - kd_weight) * ce.

The teacher gives either its full logits or, from a cache, its top-k log-probabilities; then the
KL is that of the two distributions over the top-k tokens plus one bucket for all the others (the
exact KL of the coarsened distributions, never above the full one).

Under bfloat16 autocast the logits are the head's bfloat16 output, taken to float32 for the
softmaxes, the losses and their gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE


def float32_logits(model, input_ids, attention_mask) -> torch.Tensor:
    """[B, L, V] logits of a causal LM (peft or DDP wrappers included, called through its own forward
    so that DDP's gradient hooks see the call), as float32 for the losses. Under bfloat16 autocast the
    head too multiplies in bfloat16, accumulating in float32 (2.6 times faster than a float32 head on
    AVX512-BF16); its output is rounded to bfloat16, an error of about 0.2% of a logit, which moves
    the KL between two models by far less than its own size (docs/BENCHMARKS.md)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


class _FullKL(torch.autograd.Function):
    """KL(p || q) per position with its gradient q - p written directly: the vocabulary-wide tensors
    are few and reused in place (on SmolLM2 they are 200 MB each for 2 x 512 tokens)."""

    @staticmethod
    def forward(ctx, student, teacher):
        log_q = F.log_softmax(student, dim=-1)
        log_p = F.log_softmax(teacher, dim=-1)
        p = log_p.exp()
        kl = log_p.sub_(log_q).mul_(p).sum(-1)
        ctx.save_for_backward(log_q, p)
        return kl

    @staticmethod
    def backward(ctx, grad):
        log_q, p = ctx.saved_tensors
        return log_q.exp_().sub_(p).mul_(grad.unsqueeze(-1)), None


def kl_full(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) per position [B, L] from two logit tensors [B, L, V]; no gradient
    flows to the teacher."""
    return _FullKL.apply(student, teacher.detach())


def kl_topk(student: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """KL per position [B, L] with the teacher given by its top-k log-probabilities [B, L, k] and
    token ids [B, L, k]; the tokens outside the top k form one bucket on both sides."""
    log_q = F.log_softmax(student, dim=-1)
    q_top = log_q.gather(-1, top_idx.long())
    p_top = top_logp.exp()
    tail_p = (1 - p_top.sum(-1)).clamp_min(1e-12)
    tail_q = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    return (p_top * (top_logp - q_top)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


@dataclass
class Objective:
    kind: str  # "kd", "ce" or "kd+ce"
    teacher: object | None = None  # teacher.Teacher for kd and kd+ce
    kd_weight: float = 0.5
    bf16: bool = False

    def __call__(self, model, batch: dict) -> torch.Tensor:
        device = batch["input_ids"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = float32_logits(model, batch["input_ids"], batch["attention_mask"])
            if self.kind == "ce":
                return cross_entropy(logits, batch["labels"])
            kl = self.kd(logits, batch)
        if self.kind == "kd":
            return kl
        return self.kd_weight * kl + (1 - self.kd_weight) * cross_entropy(logits, batch["labels"])

    def kd(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean KL over the real (unpadded) positions of the batch."""
        target = self.teacher.targets(batch, self.bf16)
        per_position = kl_full(logits, target[0]) if len(target) == 1 else kl_topk(logits, *target)
        mask = batch["attention_mask"].bool()
        return per_position[mask].mean()
