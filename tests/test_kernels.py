"""The backends against the torch reference in float64, on fresh random layers every run: the
Triton kernels on the CPU under TRITON_INTERPRET=1, the torch backend, the dispatch and its errors,
and a compile of the Triton kernels for an H100 (sm_90), which needs no GPU."""
import os

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1 before triton is imported"

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

from qrecover import kernels
from qrecover.errors import QRecoverError
from qrecover.kernels import torch_mm, torch_ref, triton_mm
from qrecover.nn import QuantLinear
from qrecover.format import dequantize_weight, pack_codes, unpack_codes

EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}  # unit roundoff


def _interpret_bfloat16_like_a_gpu():
    """Triton's interpreter (3.7.1 to 3.9.0) truncates float32 -> bfloat16 and multiplies bfloat16
    tl.dot operands as raw integers; a GPU rounds to nearest even and multiplies the values."""
    builder = interpreter.InterpreterBuilder
    cast, dot = builder.cast_impl, builder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, *args):
        widen = lambda t: self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t  # noqa: E731
        return dot(self, widen(a), widen(b), d, *args)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot


_interpret_bfloat16_like_a_gpu()
for _fn in (triton_mm._mixed_matmul_kernel, tl.zeros):
    assert isinstance(_fn, interpreter.InterpretedFunction), f"{_fn} was decorated before TRITON_INTERPRET=1"


def random_layer(K, N, bits, group_size, k, bias=True, act_order=False, salient_dtype=torch.float16, zero_offset=1):
    """A layer with random codes, zeros, scales and salient columns, as checkpoint format v1 allows;
    qzeros as GPTQ v1 (zero_offset 1) or v2 (0) store them."""
    n_groups = 1 if group_size == -1 else -(-K // group_size)
    g_idx = torch.arange(K) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K)]
    stored_zeros = torch.randint(0, 2**bits - 1, (n_groups, N))  # zero - zero_offset
    codes = torch.randint(0, 2**bits, (K, N))
    salient_idx = torch.randperm(K)[:k].sort().values
    codes[salient_idx] = stored_zeros[g_idx[salient_idx]] + zero_offset  # the dense part is 0 there
    layer = QuantLinear(K, N, bits, n_groups, k, bias, salient_dtype, zero_offset)
    layer.qweight.copy_(pack_codes(codes, bits))
    layer.qzeros.copy_(pack_codes(stored_zeros.t(), bits).t())
    layer.scales.copy_(torch.rand(n_groups, N) * 0.02 / 2**bits + 1e-4)
    layer.g_idx.copy_(g_idx)
    layer.salient_idx.copy_(salient_idx)
    layer.salient_weight.data.copy_(torch.randn(N, k) * 0.02)
    if bias:
        layer.bias.copy_(torch.randn(N) * 0.1)
    return layer


def assert_matches_reference(layer, x, y, weights_rounded=False):
    """y against the reference in float64, with the scales, salient weight and bias as the input dtype
    holds them, and the dense weight exact or (weights_rounded: tl.dot and cuBLAS paths) rounded to the
    input dtype as torch_ref rounds it. What remains is the output's rounding and float32 summation."""
    x64 = x.reshape(-1, layer.in_features).double()
    dense = dequantize_weight(layer.qweight, layer.qzeros, layer.scales.to(x.dtype), layer.g_idx, layer.bits,
                              layer.in_features, layer.zero_offset, x.dtype if weights_rounded else torch.float64)
    dense = dense.double()
    ref = torch_ref.add_columns(x64 @ dense, x64, layer.salient_idx, layer.salient_weight.to(x.dtype).double(),
                                None if layer.bias is None else layer.bias.to(x.dtype).double())
    magnitude = x64.abs() @ dense.abs() + x64[:, layer.salient_idx.long()].abs() @ layer.salient_weight.double().abs().t()
    bound = 2 * EPS[x.dtype] * ref.abs() + 2.0**-14 * magnitude + 1e-9
    err = (y.reshape(ref.shape).double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    assert (err <= bound).all(), f"max error {err.max():.3g}, {(err > bound).sum()} of {err.numel()} outside the bound"


# Odd shapes: M = 1 (matrix-vector path), 3, 17; K not a multiple of 32, of the 512-row tile or of
# the group; partial last group; per-channel; act-order g_idx; group size not a multiple of 32.
SHAPES = [
    dict(M=1, K=576, N=72, group_size=128, k=7),
    dict(M=3, K=300, N=40, group_size=-1, k=0, bias=False),
    dict(M=17, K=1100, N=70, group_size=32, k=40, act_order=True, salient_dtype=torch.bfloat16),
    dict(M=5, K=200, N=33, group_size=48, k=3),
]


def _workspaces_are_clean():
    return all(not sums.any() and not arrivals.any() for sums, arrivals in triton_mm._workspaces.values())


# Every bit width, every input dtype, both zero-point formats (float16 inputs with GPTQ v1, bfloat16
# with v2): unpacking depends on the bits and the format, the dot products on the dtype, so each
# width runs in one dtype and 4 bits in both (the interpreter takes about 10 s a combination).
@pytest.mark.parametrize("bits, dtype", [(2, torch.float16), (3, torch.bfloat16), (4, torch.float16), (4, torch.bfloat16), (8, torch.bfloat16)],
                         ids=["w2-fp16", "w3-bf16", "w4-fp16", "w4-bf16", "w8-bf16"])
def test_triton_kernels_match_the_reference(bits, dtype):
    for shape in SHAPES:
        shape = dict(shape)
        M = shape.pop("M")
        # Both zero-point formats, GPTQ v1 and v2 (one per dtype, to keep the interpreter's time).
        layer = random_layer(bits=bits, zero_offset=int(dtype == torch.float16), **shape)
        # A row stride larger than K, as a slice of a wider activation gives.
        x = torch.randn(M, layer.in_features + 5, dtype=dtype)[:, : layer.in_features]
        for method in ("fused", "dequantize"):
            out = torch.full((M, layer.out_features), float("nan"), dtype=dtype)
            y = triton_mm.forward(layer, x, out=out, method=method)
            assert y.data_ptr() == out.data_ptr()
            assert_matches_reference(layer, x, y, weights_rounded=M > 1 or method == "dequantize")
            assert _workspaces_are_clean(), "split-K left partial sums or arrival counts behind"


def test_the_bound_catches_one_code_off_by_one():
    layer = random_layer(1100, 70, 4, 128, 5)
    x = torch.randn(3, 1100, dtype=torch.float16)
    codes = unpack_codes(layer.qweight, 4, 1100)
    row = next(r for r in torch.randperm(1100).tolist() if r not in layer.salient_idx.tolist())
    codes[row, 7] = codes[row, 7] + 1 if codes[row, 7] < 15 else codes[row, 7] - 1
    x[:, row], layer.scales[:, 7] = 4.0, 2e-3  # large enough to tell: one step of 4 * 2e-3
    y = triton_mm.forward(layer, x)
    layer.qweight.copy_(pack_codes(codes, 4))
    with pytest.raises(AssertionError, match="3 of 210 outside the bound"):
        assert_matches_reference(layer, x, y, weights_rounded=True)


def test_group_layout_is_detected_and_recomputed_after_changes():
    layer = random_layer(576, 40, 4, 128, 3)
    assert triton_mm.group_layout(layer) == (True, 128)
    layer.g_idx.copy_(layer.g_idx[torch.randperm(576)])
    assert triton_mm.group_layout(layer)[0] is False
    assert triton_mm.group_layout(random_layer(100, 40, 4, -1, 0)) == (True, triton_mm.TILE_K)


def test_dispatch_runs_triton_when_forced(monkeypatch):
    layer = random_layer(576, 72, 3, 128, 5)
    x = torch.randn(2, 3, 576, dtype=torch.float16)
    assert kernels.choose(layer, x) == "torch"  # auto on the CPU
    with kernels.use_backend("triton"):
        assert kernels.choose(layer, x) == "triton"
        assert_matches_reference(layer, x, layer(x), weights_rounded=True)
    monkeypatch.setenv("QRECOVER_BACKEND", "triton")
    assert kernels.choose(layer, x) == "triton"


@pytest.mark.parametrize("M", [1, 40, 300])
def test_torch_backend_matches_the_reference(M):
    # act-order groups with salient columns, a partial last group; M = 40 and 300 take the two
    # chunked strategies (scale the outputs / scale the weights).
    layer = random_layer(1000, 96, 3, 128, 24, act_order=M == 40, zero_offset=int(M != 300))  # M = 300: GPTQ v2
    x = torch.randn(M, 1000, dtype=torch.float64)
    with kernels.use_backend("torch"):
        y = layer(x)
    assert_matches_reference(layer, x, y)
    x32 = x.float()
    assert_matches_reference(layer, x32, torch_mm.forward(layer, x32))
    for dtype in (torch.float16, torch.bfloat16):  # summed in float32, then rounded like torch_ref: a few ulps
        xh = x.to(dtype)
        ref = torch_ref.forward(layer, xh.double())
        assert (torch_mm.forward(layer, xh).double() - ref).abs().max() <= 4 * EPS[dtype] * ref.abs().max()


def test_torch_backend_sees_in_place_changes():
    layer, other = random_layer(300, 40, 4, 64, 2), random_layer(300, 40, 4, 64, 2)
    x = torch.randn(4, 300)
    before = torch_mm.forward(layer, x)
    layer.load_state_dict(other.state_dict())  # copies into the same tensors, as from_tensors does
    after = torch_mm.forward(layer, x)
    assert not torch.allclose(before, after)
    assert_matches_reference(layer, x, after)


def test_torch_backend_is_differentiable_in_salient_weight():
    layer = random_layer(200, 30, 4, 64, 4)
    layer.salient_weight.requires_grad_(True)
    x = torch.randn(3, 200)
    assert kernels.choose(layer, x) == "torch"
    layer(x).sum().backward()
    assert torch.allclose(layer.salient_weight.grad, x[:, layer.salient_idx.long()].sum(0).expand(30, 4).half())
    with kernels.use_backend("triton"), pytest.raises(QRecoverError, match="inference-only"):
        kernels.mixed_linear(layer, x.half())


def test_dispatch_errors(monkeypatch):
    layer = random_layer(64, 32, 4, 32, 2)
    with pytest.raises(QRecoverError, match=r"input is on meta but the layer's weights are on cpu"):
        layer(torch.randn(2, 64, device="meta"))
    with pytest.raises(QRecoverError, match=r"torch.int64 is not supported; use one of float16, bfloat16, float32, float64"):
        layer(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(QRecoverError, match=r"last dimension is \(65,\) but the layer has in_features=64"):
        layer(torch.randn(2, 65))
    with kernels.use_backend("triton"), pytest.raises(QRecoverError, match="takes float16, bfloat16 inputs, not torch.float32"):
        layer(torch.randn(2, 64))
    with pytest.raises(QRecoverError, match="unknown backend 'marlin'; choose one of auto, torch, triton"):
        kernels.use_backend("marlin").__enter__()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(QRecoverError, match="not available here: .*CUDA.*; available: torch$"):
        layer(torch.randn(2, 64, dtype=torch.float16))
    monkeypatch.setenv("QRECOVER_BACKEND", "fast")
    with pytest.raises(QRecoverError, match="QRECOVER_BACKEND: unknown backend 'fast'"):
        layer(torch.randn(2, 64))


COMPILE_FOR_H100 = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from qrecover.kernels import triton_mm as T

    def compile(fn, types, constexprs):
        names = fn.arg_names
        sig = {n: "constexpr" if n in constexprs else types[n] for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
        src = ASTSource(fn, sig, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

    for bits, block_m, act, trivial in [(4, 1, "fp16", True), (3, 16, "bf16", True), (2, 64, "fp16", False), (8, 1, "bf16", False)]:
        types = dict(x_ptr=f"*{act}", y_ptr=f"*{act}", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16",
                     g_idx_ptr="*i32", salient_idx_ptr="*i32", salient_w_ptr="*bf16", bias_ptr="*fp16",
                     workspace_ptr="*fp32", arrivals_ptr="*i32")
        types.update({n: "i32" for n in T._mixed_matmul_kernel.arg_names if n not in types})
        dtype = tl.float16 if act == "fp16" else tl.bfloat16
        compile(T._mixed_matmul_kernel, types, dict(BITS=bits, BLOCK_M=block_m, BLOCK_N=64, DTYPE=dtype,
                TRIVIAL_GROUPS=trivial, HAS_BIAS=True, SPLIT_K=True))
        types = dict(qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16", g_idx_ptr="*i32", w_out_ptr=f"*{act}")
        types.update({n: "i32" for n in T._dequantize_kernel.arg_names if n not in types})
        compile(T._dequantize_kernel, types, dict(BITS=bits, BLOCK_N=64, DTYPE=dtype, TRIVIAL_GROUPS=trivial))
    print("compiled")
""")


@pytest.mark.slow
def test_triton_kernels_compile_for_an_h100():
    """The interpreter runs kernels as Python; this compiles them as a GPU would (ptxas included)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
