"""The torch backend: the layer in plain torch ops, without unpacking the GPTQ words on every call.

Unpacking (format.dequantize_weight) takes many integer passes over the weight: re-doing it per
call made CPU decode about 100x slower than float32. So the first call keeps d = code - zero,
exact in int8 (int16 at 8 bits): 1 byte per weight, a quarter of a float32 copy, twice the packed
4-bit size. Its rows are regrouped as [n_groups, group_rows, out], zero-padded, so that a group's
scale applies by broadcasting instead of a gather per weight:

    y = sum_g (x_g @ d_g) * scale_g        (few rows: scale the outputs, [M, out] per group)
    y = x_pad @ (d * scale)                (many rows: scale the weights once)

Salient rows are left out (their d is 0), which also makes act-order groups equal-sized. Work is
chunked by groups so no temporary exceeds CHUNK_ELEMENTS; float16/bfloat16 inputs are summed in
float32. Differentiable in salient_weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import torch_ref
from .cache import derived
from ..format import unpack_codes

CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 per temporary: stays in a CPU core's L2/L3


@dataclass
class GroupedCodes:
    d: torch.Tensor  # [n_groups * group_rows, out] int8/int16: code - zero, grouped, zero-padded
    rows: torch.Tensor  # [n_groups * group_rows] input row of each d row; in_features for padding
    group_rows: int


def grouped_codes(layer) -> GroupedCodes:
    K, N, n_groups = layer.in_features, layer.out_features, layer.scales.shape[0]
    codes = unpack_codes(layer.qweight, layer.bits, K)
    g_idx = layer.g_idx.long()
    d = codes - layer.zeros()[g_idx]
    keep = torch.ones(K, dtype=torch.bool, device=d.device)
    keep[layer.salient_idx.long()] = False
    rows = keep.nonzero().squeeze(1)
    rows = rows[torch.argsort(g_idx[rows], stable=True)]
    g = g_idx[rows]
    counts = torch.bincount(g, minlength=n_groups)
    group_rows = max(int(counts.max()), 1) if rows.numel() else 1
    slot = g * group_rows + torch.arange(rows.numel(), device=d.device) - (torch.cumsum(counts, 0) - counts)[g]
    padded_rows = torch.full((n_groups * group_rows,), K, dtype=torch.long, device=d.device)
    padded_rows[slot] = rows
    padded_d = torch.zeros(n_groups * group_rows, N, dtype=torch.int8 if layer.bits < 8 else torch.int16, device=d.device)
    padded_d[slot] = d[rows].to(padded_d.dtype)
    return GroupedCodes(padded_d, padded_rows, group_rows)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    codes = derived(layer, "torch_grouped_codes", [layer.qweight, layer.qzeros, layer.g_idx, layer.salient_idx],
                    lambda: grouped_codes(layer))
    n_groups, N, G = layer.scales.shape[0], layer.out_features, codes.group_rows
    x2 = x.reshape(-1, layer.in_features)
    M = x2.shape[0]
    xg = F.pad(x2, (0, 1))[:, codes.rows].view(M, n_groups, G)  # the extra column is the padding's 0
    d = codes.d.view(n_groups, G, N)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # sums of halves lose bits
    scales = layer.scales.to(x.dtype).to(work)  # the scale as the input dtype holds it, as torch_ref
    xg = xg.to(work)
    scale_outputs = M <= G
    step = max(1, CHUNK_ELEMENTS // (N * max(M, G) if scale_outputs else G * N))
    y = torch.zeros(M, N, dtype=work, device=x.device)
    for g0 in range(0, n_groups, step):
        s, dg, xc = scales[g0:g0 + step, None, :], d[g0:g0 + step].to(work), xg[:, g0:g0 + step]
        if scale_outputs:
            y += (torch.bmm(xc.transpose(0, 1), dg) * s).sum(0)
        else:
            y.addmm_(xc.reshape(M, -1), (dg * s).reshape(-1, N))
    y = torch_ref.add_columns(y.to(x.dtype), x2, layer.salient_idx, layer.salient_weight, layer.bias)
    return y.view(*x.shape[:-1], N)
