import pytest
import torch

from qrecover import kernels
from qrecover.errors import QRecoverError
from qrecover.nn import QuantLinear
from qrecover.quant.gptq import gptq_quantize


def quantized_layer(bits, group_size=32, salient=(2, 40, 79), bias=True, out_f=48, in_f=80):
    torch.manual_seed(bits)
    W = torch.randn(out_f, in_f)
    X = torch.randn(512, in_f)
    result = gptq_quantize(W, X.t() @ X / 512, bits=bits, group_size=group_size, salient_idx=torch.tensor(salient, dtype=torch.long))
    b = torch.randn(out_f) if bias else None
    return result, QuantLinear.from_result(result, b), b


def solver_weight(result, group_size: int) -> torch.Tensor:
    """W[o, i] = scale[o, i // group] * (code[o, i] - zero[o, i // group]), the salient columns as
    they are: written out weight by weight from the solver's codes, independent of packing and of
    the package's dequantization. Scales and salient weights are stored in float16."""
    out_f, in_f = result.codes.shape
    scales, zeros = result.scales.half().double(), result.zeros.double()
    w = torch.empty(out_f, in_f, dtype=torch.float64)
    for i in range(in_f):
        g = i // group_size if group_size > 0 else 0
        w[:, i] = scales[g] * (result.codes[:, i].double() - zeros[g])
    for j, col in enumerate(result.salient_idx.tolist()):
        w[:, col] = result.salient_weight[:, j].half().double()
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_forward_matches_the_quantized_weight(bits, group_size):
    result, layer, bias = quantized_layer(bits, group_size)
    x = torch.randn(5, 80)
    w = solver_weight(result, group_size)
    assert torch.allclose(layer.dequantize(torch.float64), w, rtol=0, atol=1e-12)
    expected = x.double() @ w.t() + bias.half().double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)


def test_dense_part_is_zero_at_salient_columns():
    _, layer, _ = quantized_layer(3)
    dense = layer.dequantize_dense(torch.float64)  # [in, out]
    assert torch.all(dense[[2, 40, 79]] == 0)
    assert torch.all(dense[[0, 1, 3]].abs().sum(dim=1) > 0)


def test_k_zero_and_no_bias():
    _, layer, _ = quantized_layer(4, salient=(), bias=False)
    assert layer.n_salient == 0 and layer.bias is None
    x = torch.randn(3, 80)
    assert torch.allclose(layer(x), x @ layer.dequantize().t(), atol=1e-5)


def test_held_dense_gives_the_same_output():
    _, layer, _ = quantized_layer(4)
    x = torch.randn(7, 80)
    plain = layer(x)
    layer.hold_dense(True)
    # The held weight goes through torch_ref, the packed one through torch_mm: same sums, other order.
    assert torch.allclose(layer(x), plain, rtol=1e-5, atol=1e-5)
    layer.hold_dense(False)
    assert not kernels.holds_dense(layer)


def test_from_tensors_round_trip_and_errors():
    _, layer, _ = quantized_layer(3)
    tensors = dict(layer.state_dict())
    again = QuantLinear.from_tensors(tensors, 3, 1)
    x = torch.randn(2, 80)
    assert torch.equal(again(x), layer(x)) and again.bits == 3
    with pytest.raises(QRecoverError, match="missing tensors"):
        QuantLinear.from_tensors({k: v for k, v in tensors.items() if k != "qzeros"}, 3, 1)
    bad = dict(tensors, scales=tensors["scales"][:1])
    with pytest.raises(QRecoverError, match=r"qzeros is \(3, 5\).*expected \(1, 5\)"):
        QuantLinear.from_tensors(bad, 3, 1)
    with pytest.raises(QRecoverError, match=r"qweight is \(8, 48\).*expected \(10, 48\).*4-bit"):
        QuantLinear.from_tensors(tensors, 4, 1)
    with pytest.raises(QRecoverError, match="unexpected tensors"):
        QuantLinear.from_tensors(dict(tensors, extra=torch.zeros(1)), 3, 1)
