"""Which input columns of a linear layer stay in 16-bit.

The generalized GIFT-SW metric scores column j as

    s_j = ||M_j||_tau * ||X_j||_rho ** gamma

where X_j is input feature j over all calibration tokens and M is, per preset, the quantization
error D = W - Q(W) of a per-row symmetric quantizer with an MSE-searched clip (GIFT-SW, OWQ), the
weight itself (Wanda-like), or nothing (QUIK: activations only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant.grid import fit_grid, quantize_dequantize

INF = math.inf


@dataclass(frozen=True)
class Metric:
    matrix: str  # "error" (W - Q(W)), "weight" (W) or "none"
    tau: float
    rho: float
    gamma: float


METRICS = {
    # The paper's choice: max_i |D_ij| * max_t |X_tj|.
    "gift": Metric("error", INF, INF, 1.0),
    # OWQ's H_jj * ||D_j||_2^2 with H_jj = ||X_j||_2^2: the same ranking as ||D_j||_2 * ||X_j||_2.
    "owq": Metric("error", 2.0, 2.0, 1.0),
    # QUIK: the columns with the largest activation outliers.
    "quik": Metric("none", INF, INF, 1.0),
    # Wanda-like: ||W_j||_1 * ||X_j||_2.
    "wanda": Metric("weight", 1.0, 2.0, 1.0),
    # Ablation baseline: uniformly random columns.
    "random": Metric("none", INF, INF, 0.0),
}


def resolve_metric(name: str, tau=None, rho=None, gamma=None) -> Metric:
    """A preset with optional overrides of its norms and exponent."""
    base = METRICS[name]
    return Metric(
        base.matrix,
        base.tau if tau is None else float(tau),
        base.rho if rho is None else float(rho),
        base.gamma if gamma is None else float(gamma),
    )


def column_norm(m: torch.Tensor, p: float) -> torch.Tensor:
    """The p-norm of every column of m (p = inf: the largest magnitude)."""
    return torch.linalg.vector_norm(m.float(), ord=p, dim=0)


def column_scores(
    weight: torch.Tensor,
    act_norm: torch.Tensor,
    metric: Metric,
    bits: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """s_j for every input column; act_norm holds ||X_j||_rho over the calibration tokens."""
    if metric.gamma == 0.0 and metric.matrix == "none":
        return torch.rand(weight.shape[1], generator=generator)
    if metric.matrix == "error":
        w = weight.float()
        scale, zero = fit_grid(w, bits, sym=True, mse=True)
        m_norm = column_norm(w - quantize_dequantize(w, scale, zero, 2**bits - 1), metric.tau)
    elif metric.matrix == "weight":
        m_norm = column_norm(weight, metric.tau)
    else:
        m_norm = torch.ones(weight.shape[1])
    return m_norm.to(act_norm.device) * act_norm.float().pow(metric.gamma)


def select_salient(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The sorted indices of the k highest-scoring columns."""
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.topk(scores, k).indices.sort().values.cpu()
