"""Triton kernels for the mixed-precision linear layer (checkpoint format v1).

    y = x @ deq(qweight) + x[:, salient_idx] @ salient_weight^T (+ bias)

GPTQ v1 packs the codes of every 32 consecutive input rows into BITS int32 words, one little-endian
bit stream: code p of a 32-row block sits at bit p*BITS (at 3 bits codes 10 and 21 straddle two
words). A weight tile is R blocks (32*R input rows) by BLOCK_N output columns, multiplied as 32
slices: slice p holds code p of every block, so each packed word is loaded once and unpacked with
shifts known at compile time, and slice p meets the x values of rows 32*b + p in one tl.dot.

Two ways to run a layer, picked by `forward` from the number of rows M of x:
- "fused" (M <= FUSED_MAX_M: decode, small batches): `_mixed_matmul_kernel` dequantizes tiles in
  registers, straight into tl.dot. Decode has too few output tiles to occupy the GPU, so K is
  split over several programs per output tile; their fp32 partial sums meet in a workspace and the
  last program of a tile to arrive writes the output and zeroes the workspace again (one launch: no
  memset, no cast kernel). The product is computed transposed (acc = W^T x^T, [BLOCK_N, BLOCK_M])
  so the dequantized tile is the left operand, which Hopper's wgmma reads from registers, and a
  16-row M tile suffices. The salient columns are a few more tl.dot tiles in the same programs.
- "dequantize" (larger M: prefill): tensor-core time dominates and cuBLAS is the fastest matmul
  there is, so `_dequantize_kernel` writes the dense weight once into a transient buffer, the
  salient columns are copied into its (zero) salient rows, and one torch.addmm does the rest.
tools/bench_kernel.py measures both at every M.

Every weight value is rounded to the activation dtype exactly as format.dequantize_weight
rounds it, so the kernels differ from the reference only in summation order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache import derived

BLOCKS = tl.constexpr(16)  # 32-row blocks per weight tile: the K of each slice's tl.dot (>= 16)
TILE_K = 32 * BLOCKS.value  # input rows per weight tile
FUSED_MAX_M = 64  # up to this many rows the fused kernel runs; above, dequantize + cuBLAS
PROGRAMS_PER_SM = 4  # split K until a launch has about this many programs per SM
DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _code(lo, hi, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """2^23 + the code at bit SHIFT of word lo (continued in word hi if it straddles), as float32.
    OR-ing the code into the mantissa of 2^23 converts it exactly with integer-pipe ops: a real
    int-to-float conversion runs at a quarter of the rate and would bound decode speed."""
    v = lo >> SHIFT
    if SHIFT + BITS > 32:
        v = v | (hi << (32 - SHIFT))
    return ((v & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _zero_points(qzeros_ptr, g, n, mask, zero_stride, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr):
    """2^23 + the zero points of groups g at output columns n (broadcast together) as float32, from
    GPTQ qzeros, which packs along the output dimension and stores zero - ZERO_OFFSET (1 in v1, 0 in v2)."""
    bit = (n % 32) * BITS
    ptr = qzeros_ptr + g * zero_stride + (n // 32) * BITS + bit // 32
    shift = (bit % 32).to(tl.uint32)
    v = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:  # 3 bits: codes 10 and 21 of each 32 continue in the next word
        spill = mask & (shift + BITS > 32)
        hi = tl.load(ptr + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
        v = v | tl.where(spill, hi << ((32 - shift) % 32), 0)
    return ((v & ((1 << BITS) - 1)) + ZERO_OFFSET).to(tl.float32) + 8388608.0


@triton.jit
def _words(qweight_ptr, row, n, n_mask, N, word_rows):
    """qweight[row, n] as uint32, [BLOCK_N, BLOCKS]; rows past the end (a partial last block) read 0."""
    mask = n_mask[:, None] & (row < word_rows)[None, :]
    return tl.load(qweight_ptr + row[None, :] * N + n[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)


@triton.jit
def _group_params(qzeros_ptr, scales_ptr, g, n, mask, N, zero_stride, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
                  DTYPE: tl.constexpr):
    """(2^23 + zero, scale) as float32 at groups g, columns n; the scale rounded to DTYPE as torch_ref does."""
    zero = _zero_points(qzeros_ptr, g, n, mask, zero_stride, BITS, ZERO_OFFSET)
    scale = tl.load(scales_ptr + g * N + n, mask=mask, other=0).to(DTYPE).to(tl.float32)
    return zero, scale


@triton.jit
def _slice_code(qweight_ptr, block, p, n, n_mask, N, word_rows, BITS: tl.constexpr):
    """2^23 + code p (a runtime value) of every block, as float32, loading its word(s) again: the
    compact form of _code's unrolled unpacking, for the act-order path."""
    bit = p * BITS
    row = block * BITS + bit // 32
    shift = (bit % 32).to(tl.uint32)
    v = _words(qweight_ptr, row, n, n_mask, N, word_rows) >> shift
    if 32 % BITS != 0:  # 3 bits: codes 10 and 21 continue in the next word
        spill = shift + BITS > 32
        hi = _words(qweight_ptr, row + 1, n, n_mask & spill, N, word_rows)
        v = v | tl.where(spill, hi << ((32 - shift) % 32), 0)
    return ((v & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _use_slice(acc, part, w, k, k_mask, x_ptr, w_out_ptr, n, n_mask, m, m_mask, N, stride_xm,
               DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_WEIGHT: tl.constexpr):
    """Slice w [BLOCK_N, BLOCKS] of input rows k meets x: into acc by tl.dot, into part by FMAs
    (BLOCK_M = 1: no tensor-core padding of M to 16), or (WRITE_WEIGHT) stored to w_out [K, N]."""
    if WRITE_WEIGHT:
        tl.store(w_out_ptr + k[None, :] * N + n[:, None], w.to(DTYPE), mask=n_mask[:, None] & k_mask[None, :])
    elif BLOCK_M == 1:
        xs = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        part += w * xs.to(tl.float32)
    else:  # w rounded to DTYPE exactly as format.dequantize_weight rounds it
        xs = tl.load(x_ptr + m[None, :] * stride_xm + k[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0)
        acc = tl.dot(w.to(DTYPE), xs, acc)
    return acc, part


@triton.jit
def _dense_tile(acc, t, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, x_ptr, w_out_ptr,
                n, n_mask, m, m_mask, N, K, word_rows, zero_stride, stride_xm, group_size,
                BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, DTYPE: tl.constexpr, TRIVIAL_GROUPS: tl.constexpr,
                BLOCK_M: tl.constexpr, WRITE_WEIGHT: tl.constexpr):
    """Weight tile t (input rows TILE_K*t ...) meets x: returns acc + tile^T @ x^T ([BLOCK_N, BLOCK_M]);
    with BLOCK_M = 1, acc + tile^T * x elementwise ([BLOCK_N, BLOCKS], summed by the caller); with
    WRITE_WEIGHT, stores the dequantized tile to w_out [K, N] instead."""
    block = t * BLOCKS + tl.arange(0, BLOCKS)
    row0 = block * 32  # first input row of each block
    gemv: tl.constexpr = BLOCK_M == 1 and not WRITE_WEIGHT
    part = tl.zeros_like(acc)  # gemv: (q - z) x summed per block, scaled once per tile
    if TRIVIAL_GROUPS:  # g_idx = k // group_size with group_size % 32 == 0: a block is in one group
        zero, scale = _group_params(qzeros_ptr, scales_ptr, (row0 // group_size)[None, :], n[:, None],
                                    n_mask[:, None] & (row0 < K)[None, :], N, zero_stride, BITS, ZERO_OFFSET, DTYPE)
        lo = _words(qweight_ptr, block * BITS, n, n_mask, N, word_rows)
        for j in tl.static_range(BITS):  # word j of every block ...
            hi = lo
            if j + 1 < BITS:
                hi = _words(qweight_ptr, block * BITS + j + 1, n, n_mask, N, word_rows)
            # ... holds the start of the codes p with 32 j <= p BITS < 32 (j + 1)
            for p in tl.static_range((32 * j + BITS - 1) // BITS, (32 * j + 32 + BITS - 1) // BITS):
                w = _code(lo, hi, (p * BITS) % 32, BITS) - zero  # q - z, exact in float32
                if not gemv:
                    w = w * scale  # exact too: at most 9 by 11 significant bits
                acc, part = _use_slice(acc, part, w, row0 + p, row0 + p < K, x_ptr, w_out_ptr, n, n_mask, m, m_mask,
                                       N, stride_xm, DTYPE, BLOCK_M, WRITE_WEIGHT)
            lo = hi
        if gemv:
            acc += part * scale
    else:  # act-order: a group per row, gathered per slice. A runtime loop: unrolled, it compiles for minutes.
        for p in range(32):
            k = row0 + p
            k_mask = k < K
            g = tl.load(g_idx_ptr + k, mask=k_mask, other=0)
            zero, scale = _group_params(qzeros_ptr, scales_ptr, g[None, :], n[:, None],
                                        n_mask[:, None] & k_mask[None, :], N, zero_stride, BITS, ZERO_OFFSET, DTYPE)
            w = (_slice_code(qweight_ptr, block, p, n, n_mask, N, word_rows, BITS) - zero) * scale
            acc, part = _use_slice(acc, part, w, k, k_mask, x_ptr, w_out_ptr, n, n_mask, m, m_mask,
                                   N, stride_xm, DTYPE, BLOCK_M, WRITE_WEIGHT)
        if gemv:
            acc += part
    return acc


@triton.jit
def _salient_tile(acc, t, x_ptr, salient_idx_ptr, salient_w_ptr, n, n_mask, m, m_mask, n_salient, stride_xm,
                  DTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Salient columns BLOCKS*t ... meet x, accumulated like _dense_tile."""
    j = t * BLOCKS + tl.arange(0, BLOCKS)
    j_mask = j < n_salient
    col = tl.load(salient_idx_ptr + j, mask=j_mask, other=0)
    w = tl.load(salient_w_ptr + n[:, None] * n_salient + j[None, :], mask=n_mask[:, None] & j_mask[None, :], other=0)
    w = w.to(DTYPE)  # torch_ref: salient_weight.to(x.dtype)
    if BLOCK_M == 1:
        xs = tl.load(x_ptr + m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0)
        acc += w.to(tl.float32) * xs.to(tl.float32)
    else:
        xs = tl.load(x_ptr + m[None, :] * stride_xm + col[:, None], mask=j_mask[:, None] & m_mask[None, :], other=0)
        acc = tl.dot(w, xs, acc)
    return acc


@triton.jit
def _store_output(y_ptr, out, out_mask, acc, bias_ptr, n, n_mask, HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr):
    if HAS_BIAS:  # torch_ref adds the bias in the activation dtype
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0).to(DTYPE).to(tl.float32)[:, None]
    tl.store(y_ptr + out, acc.to(DTYPE), mask=out_mask)


@triton.jit
def _mixed_matmul_kernel(
    x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, salient_idx_ptr, salient_w_ptr, bias_ptr,
    y_ptr, workspace_ptr, arrivals_ptr,
    M, N, K, n_salient, word_rows, zero_stride, stride_xm, group_size, tiles_per_split,
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
    TRIVIAL_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y^T tile (pid 0: columns, pid 1: rows) over the K-split pid 2 of tl.num_programs(2)."""
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = n < N, m < M
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCKS), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    first = pid_s * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(K, 32 * BLOCKS))):
        acc = _dense_tile(acc, t, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, x_ptr, y_ptr,
                          n, n_mask, m, m_mask, N, K, word_rows, zero_stride, stride_xm, group_size,
                          BITS, ZERO_OFFSET, DTYPE, TRIVIAL_GROUPS, BLOCK_M, False)
    # The few salient tiles are dealt round-robin to the splits, to keep their work even.
    for t in range(pid_s, tl.cdiv(n_salient, BLOCKS), tl.num_programs(2)):
        acc = _salient_tile(acc, t, x_ptr, salient_idx_ptr, salient_w_ptr, n, n_mask, m, m_mask, n_salient,
                            stride_xm, DTYPE, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1, keep_dims=True)

    out = m[None, :] * N + n[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT_K:
        tl.atomic_add(workspace_ptr + out, acc, mask=out_mask)
        tile = pid_m * tl.num_programs(0) + pid_n
        # Atomics are acq_rel: the last program to arrive sees every other split's partial sum.
        if tl.atomic_add(arrivals_ptr + tile, 1) == tl.num_programs(2) - 1:
            # Read and re-zero in one atomic, on the int32 bits (float xchg is not everywhere).
            bits_ptr = workspace_ptr.to(tl.pointer_type(tl.int32)) + out
            total = tl.atomic_xchg(bits_ptr, tl.zeros_like(acc).to(tl.int32), mask=out_mask)
            tl.atomic_xchg(arrivals_ptr + tile, 0)
            total = tl.where(out_mask, total.to(tl.float32, bitcast=True), 0.0)  # masked lanes: undefined
            _store_output(y_ptr, out, out_mask, total, bias_ptr, n, n_mask, HAS_BIAS, DTYPE)
    else:
        _store_output(y_ptr, out, out_mask, acc, bias_ptr, n, n_mask, HAS_BIAS, DTYPE)


@triton.jit
def _dequantize_kernel(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, w_out_ptr,
                       N, K, word_rows, zero_stride, group_size,
                       BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                       TRIVIAL_GROUPS: tl.constexpr):
    """The dense part deq(qweight) [K, N] in DTYPE, one weight tile per program (no x involved)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    no_rows = tl.arange(0, 1)
    _dense_tile(tl.zeros((BLOCK_N, 1), dtype=tl.float32), tl.program_id(1), qweight_ptr, qzeros_ptr, scales_ptr,
                g_idx_ptr, w_out_ptr, w_out_ptr, n, n < N, no_rows, no_rows < 0, N, K, word_rows, zero_stride, 0,
                group_size, BITS, ZERO_OFFSET, DTYPE, TRIVIAL_GROUPS, 1, True)


def group_layout(layer) -> tuple[bool, int]:
    """(trivial, group_size): trivial when g_idx[k] = k // group_size with group_size % 32 == 0, so a
    32-row block lies in one group. Checked once per layer (it needs a device sync) and cached."""

    def check():
        g_idx, K = layer.g_idx, layer.in_features
        if layer.scales.shape[0] == 1:
            return bool((g_idx == 0).all()), TILE_K * triton.cdiv(K, TILE_K)
        size = int((g_idx == 0).sum())
        ok = size % 32 == 0 and torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // size)
        return ok, size

    return derived(layer, "triton_group_layout", [layer.g_idx], check)


def _launch_shape(M: int, N: int, K: int, n_sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, splits, tiles_per_split): split K until the launch fills the GPU."""
    block_m = 1 if M == 1 else 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    tiles = triton.cdiv(K, TILE_K)
    out_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * n_sms, out_tiles)))
    per_split = triton.cdiv(tiles, splits)
    return block_m, block_n, triton.cdiv(tiles, per_split), per_split


_workspaces: dict = {}


def _workspace(device: torch.device, n_out: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 partial sums and arrival counters for split-K, one pair per device and stream.
    The kernel leaves them zero again, so they are allocated once and grown, never cleared."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    sums, arrivals = _workspaces.get(key, (None, None))
    if sums is None or sums.numel() < n_out:
        sums = torch.zeros(max(n_out, 1 << 16), dtype=torch.float32, device=device)
    if arrivals is None or arrivals.numel() < n_tiles:
        arrivals = torch.zeros(max(n_tiles, 1 << 12), dtype=torch.int32, device=device)
    _workspaces[key] = (sums, arrivals)
    return sums, arrivals


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the CPU interpreter: small, so the tests still exercise split-K


def fused(layer, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = the layer applied to x2 [M, K] by `_mixed_matmul_kernel`."""
    (M, K), N = x2.shape, layer.out_features
    trivial, group_size = group_layout(layer)
    block_m, block_n, splits, per_split = _launch_shape(M, N, K, _sm_count(x2.device))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), splits)
    split = splits > 1  # else the workspace is only a placeholder argument
    sums, arrivals = _workspace(x2.device, M * N if split else 0, grid[0] * grid[1] if split else 0)
    bias = layer.bias if layer.bias is not None else layer.scales  # any pointer: unused without HAS_BIAS
    _mixed_matmul_kernel[grid](
        x2, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.salient_idx, layer.salient_weight.contiguous(), bias,
        out, sums, arrivals,
        M, N, K, layer.n_salient, layer.qweight.shape[0], layer.qzeros.shape[1], x2.stride(0), group_size, per_split,
        BITS=layer.bits, ZERO_OFFSET=layer.zero_offset, BLOCK_M=block_m, BLOCK_N=block_n, DTYPE=DTYPES[x2.dtype],
        TRIVIAL_GROUPS=trivial, HAS_BIAS=layer.bias is not None, SPLIT_K=split,
        num_warps=4,
    )
    return out


def dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's full weight, transposed ([in, out], dense part plus salient rows), in dtype."""
    K, N = layer.in_features, layer.out_features
    trivial, group_size = group_layout(layer)
    w = torch.empty(K, N, dtype=dtype, device=layer.qweight.device)
    block_n = 64
    _dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, TILE_K))](
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx, w,
        N, K, layer.qweight.shape[0], layer.qzeros.shape[1], group_size,
        BITS=layer.bits, ZERO_OFFSET=layer.zero_offset, BLOCK_N=block_n, DTYPE=DTYPES[dtype], TRIVIAL_GROUPS=trivial,
        num_warps=4,
    )
    if layer.n_salient:  # the dense part is exactly 0 there
        w.index_copy_(0, layer.salient_idx.long(), layer.salient_weight.t().to(dtype))
    return w


def forward(layer, x: torch.Tensor, out: torch.Tensor | None = None, method: str = "auto") -> torch.Tensor:
    """The layer's output for x [..., in] (float16 or bfloat16), written into out [M, out] if given.
    method: "fused", "dequantize" (then cuBLAS), or "auto" (fused up to FUSED_MAX_M rows)."""
    x2 = x.reshape(-1, layer.in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], layer.out_features
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    if method == "fused" or (method == "auto" and M <= FUSED_MAX_M):
        fused(layer, x2, out)
    elif layer.bias is None:
        torch.matmul(x2, dequantize(layer, x.dtype), out=out)
    else:
        torch.addmm(layer.bias.to(x.dtype), x2, dequantize(layer, x.dtype), out=out)
    return out.view(*x.shape[:-1], N)
