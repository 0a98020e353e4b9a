"""GPTQ with salient columns (Frantar et al. 2022; salient handling as in QUIK and OWQ).

Columns are permuted so the salient ones come last. GPTQ walks the other columns, rounding each
to its grid and spreading the rounding error over the columns not yet visited through the inverse
Hessian; the salient columns are never rounded, so they absorb the error feedback of the whole
layer. Without a Hessian (H is None) the same walk is round-to-nearest.

Groups: with desc_act off, column j belongs to group j // group_size of the original order, and
the grid of a group is fitted on its non-salient columns only, when the walk reaches the group.
The walk then visits the groups by decreasing max H_jj and the columns of a group by decreasing
H_jj (group-aware reordering, GAR: Gafni et al. 2025, GPTQModel's default), which keeps the
trivial g_idx that fast kernels want. With desc_act on, the walk visits all columns by decreasing
H_jj and groups are runs of group_size visited columns (GPTQ's act-order; g_idx records them).
"""
from __future__ import annotations

import math

import torch

from ..errors import QRecoverError
from ..format import QuantResult
from .grid import dequantize, fit_grid, quantize

BLOCK = 128  # columns per lazy-update block when there are no groups to follow
MAX_DAMP = 1.0


def inverse_hessian_cholesky(H: torch.Tensor, damp: float):
    """(upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the damp used, the value added to
    the diagonal), raising damp until H is positive definite. H's diagonal is dampened in place (and
    left so); the factor, its inverse and the result share one buffer (LAPACK works in place), so
    besides H one matrix of its size is made: at 7B the down projection's is 485 MB."""
    diag = H.diagonal()
    undamped = diag.clone()
    mean_diag = undamped.mean()
    while damp <= MAX_DAMP:
        torch.add(undamped, damp * mean_diag, out=diag)
        U, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            torch.cholesky_inverse(U, out=U)
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if info == 0:
                return U, damp, float(damp * mean_diag)
        damp *= 10
    raise QRecoverError(
        "the Hessian of a layer is not positive definite even with dampening 1.0; "
        "the calibration data is likely degenerate (use more or more varied samples)"
    )


def _column_order(quantized, diag, group_size: int, desc_act: bool, group_aware: bool):
    """The order in which GPTQ visits the quantized columns."""
    if desc_act or (group_aware and group_size == -1):
        return quantized[torch.argsort(diag[quantized], descending=True, stable=True)]
    if not group_aware:
        return quantized
    by_diag = quantized[torch.argsort(diag[quantized], descending=True, stable=True)]
    groups = by_diag // group_size
    group_max = torch.zeros(int(groups.max()) + 1, device=diag.device).scatter_reduce(
        0, groups, diag[by_diag], "amax", include_self=False
    )
    rank = torch.argsort(torch.argsort(group_max, descending=True, stable=True))
    return by_diag[torch.argsort(rank[groups], stable=True)]


def _walk(bits, group_size, desc_act, order, n_cols):
    """Blocks (start, end, group) over the permuted quantized columns, and the number of groups.

    Every block lies within one group, so a group's grid is fitted once, when its block starts;
    group None means one grid for all columns (per-channel), fitted before the walk.
    """
    nq = len(order)
    if group_size == -1:
        return [(i, min(i + BLOCK, nq), None) for i in range(0, nq, BLOCK)], 1
    if desc_act:
        return [(i, min(i + group_size, nq), i // group_size) for i in range(0, nq, group_size)], max(
            1, math.ceil(nq / group_size)
        )
    groups = (order // group_size).tolist()
    blocks, start = [], 0
    for i in range(1, nq + 1):
        if i == nq or groups[i] != groups[start]:
            blocks.append((start, i, groups[start]))
            start = i
    return blocks, math.ceil(n_cols / group_size)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    salient_idx: torch.Tensor | None = None,
    sym: bool = True,
    mse: bool = True,
    desc_act: bool = False,
    damp: float = 0.01,
    group_aware: bool = True,
) -> QuantResult:
    """Quantize W [out, in] given the input Hessian H = X^T X / N [in, in] (None: round-to-nearest).

    The grid's settings are keywords: bits, group_size (-1: one group per row), the salient columns
    kept in 16-bit (none by default), symmetric or not, MSE-searched clip, act-order, dampening and
    group-aware column order (see the module docstring)."""
    out_f, n = W.shape
    dev = W.device
    maxq = 2**bits - 1
    salient_idx = torch.empty(0, dtype=torch.long, device=dev) if salient_idx is None else salient_idx.to(dev).long()
    is_salient = torch.zeros(n, dtype=torch.bool, device=dev)
    is_salient[salient_idx] = True
    quantized = torch.nonzero(~is_salient).flatten()

    if H is not None:
        # Inputs that never fire: their weights are zeroed and their Hessian diagonal set to 1.
        diag = torch.diag(H).float()
        dead = diag == 0
        diag[dead] = 1
        if len(quantized):
            quantized = _column_order(quantized, diag, group_size, desc_act, group_aware)
    perm = torch.cat([quantized, salient_idx])
    # The walk runs over rows of W^T: one contiguous row per input column. W and H are not copied
    # beyond what the permutation makes: at 7B a Hessian is 485 MB, a stacked gate/up weight 360 MB.
    Wt = W.detach()[:, perm].t().float().contiguous()
    nq = len(quantized)
    if H is not None:
        Wt[dead[perm]] = 0
        Hp = H.detach()[perm[:, None], perm].float()
        Hp.diagonal()[dead[perm]] = 1
        Hinv, damp, damp_added = inverse_hessian_cholesky(Hp, damp)
        del Hp
        walked = torch.zeros(out_f, device=dev)

    blocks, n_groups = _walk(bits, group_size, desc_act, quantized, n)
    scales = torch.ones(n_groups, out_f, device=dev)
    zeros = torch.full((n_groups, out_f), float((maxq + 1) // 2), device=dev)
    g_perm = torch.full((n,), n_groups - 1, dtype=torch.long, device=dev)
    codes = torch.empty(n, out_f, device=dev)
    if blocks and blocks[0][2] is None:
        s, z = fit_grid(Wt[:nq].t(), bits, sym, mse)
        scales[0], zeros[0] = s.squeeze(1), z.squeeze(1)

    for i1, i2, group in blocks:
        g = 0 if group is None else group
        if group is not None:
            s, z = fit_grid(Wt[i1:i2].t(), bits, sym, mse)
            scales[g], zeros[g] = s.squeeze(1), z.squeeze(1)
        g_perm[i1:i2] = g
        s, z = scales[g], zeros[g]
        if H is None:
            codes[i1:i2] = quantize(Wt[i1:i2], s, z, maxq)
            continue
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # The column loop is the sequential heart of GPTQ: writing into preallocated rows keeps its
        # per-column overhead low.
        for i, d in enumerate(Hinv1.diagonal().tolist()):
            w, q, err = W1[i], codes[i1 + i], Err1[i]
            quantize(w, s, z, maxq, out=q)
            torch.sub(w, dequantize(q, s, z, out=err), out=err).div_(d)
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
        walked += Err1.square().sum(0)  # per row, tr(D H D^T) with the dampened H, as GPTQ minimizes it

    inv = torch.argsort(perm)
    codes, g_idx = codes[inv].t(), g_perm[inv]
    if group_size != -1 and not desc_act:
        g_idx[salient_idx] = salient_idx // group_size  # keep g_idx = j // group_size for kernels
    # Salient columns are never rounded; their code is their group's zero, so the dense part is 0.
    codes[:, salient_idx] = zeros[g_idx[salient_idx]].t()
    return QuantResult(
        codes=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        salient_idx=salient_idx.cpu(),
        salient_weight=Wt[nq:].t().contiguous(),
        bits=bits,
        damp=damp,
        walked_error=walked if H is not None else None,
        damp_added=damp_added if H is not None else 0.0,
    )


def output_error(W: torch.Tensor, W_hat: torch.Tensor | None, H: torch.Tensor | None,
                 walked: float | None = None, damp_added: float = 0.0) -> float:
    """Relative output error ||(W - W_hat) X||^2 / ||W X||^2 over the calibration inputs (H = X^T X / N),
    with damp_added on H's diagonal (GPTQ's dampening) in both terms.

    walked: the numerator as GPTQ's column walk measured it (QuantResult.walked_error, summed), which
    saves the out x in^2 product that computing it again costs (at 7B, 20 s a layer on 2 cores); W_hat
    is then not needed. Without calibration inputs (H None) it is the relative weight error
    ||W - W_hat||^2 / ||W||^2.
    """
    W = W.float()
    if H is None:
        D = W - W_hat.float().to(W.device)
        return float(D.square().sum() / W.square().sum().clamp(min=1e-30))
    W = W.to(H.device)
    den = (W @ H).mul_(W).sum() + damp_added * W.square().sum()
    if walked is None:
        D = W - W_hat.float().to(H.device)
        walked = (D @ H).mul_(D).sum() + damp_added * D.square().sum()
    return float(walked / den.clamp(min=1e-30))
