"""What the quantizer and the saliency metric need to know of a linear layer's inputs."""
from __future__ import annotations

import math

import torch

from .errors import QRecoverError

GRAM_BLOCK = 256  # H is symmetric: accumulate block rows from the diagonal on (~1/3 fewer flops)


class InputStats:
    """Accumulates, over calibration tokens, H = X^T X / N and the column norms ||X_j||_rho.

    Only the upper block triangle of X^T X is accumulated; `hessian` mirrors it.
    """

    def __init__(self, n_features: int, rho: float, hessian: bool, device, name: str = "layer"):
        self.name = name
        self.rho = rho
        self.tokens = 0
        self.H = torch.zeros(n_features, n_features, device=device) if hessian else None
        self._done = False  # H holds the Hessian itself, no longer the sums
        self._norm = torch.zeros(n_features, device=device)

    def add(self, x: torch.Tensor) -> None:
        if self._done:
            raise RuntimeError("InputStats.add after its Hessian was taken")
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.H is not None:
            for i in range(0, x.shape[1], GRAM_BLOCK):
                self.H[i : i + GRAM_BLOCK, i:].addmm_(x[:, i : i + GRAM_BLOCK].t(), x[:, i:])
        if math.isinf(self.rho):
            torch.maximum(self._norm, x.abs().amax(dim=0), out=self._norm)
        else:
            self._norm += x.abs().pow(self.rho).sum(dim=0)

    def check_finite(self) -> None:
        """NaN or Inf in any input reaches the sums; one check at the end is enough."""
        total = self._norm.sum() + (self.H.sum() if self.H is not None else 0)
        if not torch.isfinite(total):
            raise QRecoverError(
                f"the inputs of {self.name} contain NaN or Inf during calibration; the model overflows "
                "in this dtype (try --dtype float32) or its weights are broken"
            )

    @property
    def hessian(self) -> torch.Tensor | None:
        """X^T X / N, made in place from the accumulated sums (no second matrix of its size: 485 MB
        for a 7B down_proj); the statistics take no more inputs after."""
        if self.H is None or self._done:
            return self.H
        self._done = True
        self.H.div_(max(self.tokens, 1))
        for i in range(GRAM_BLOCK, self.H.shape[0], GRAM_BLOCK):
            self.H[i:, i - GRAM_BLOCK : i] = self.H[i - GRAM_BLOCK : i, i:].t()
        return self.H

    @property
    def act_norm(self) -> torch.Tensor:
        return self._norm if math.isinf(self.rho) else self._norm.pow(1.0 / self.rho)
