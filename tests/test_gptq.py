import pytest
import torch

from qrecover.errors import QRecoverError
from qrecover.quant.gptq import gptq_quantize, inverse_hessian_cholesky, output_error


def correlated_layer(out_f=64, in_f=80, tokens=2048, seed=0):
    """A weight and an input Hessian with correlated, unevenly scaled features (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = torch.randn(tokens, in_f, generator=g) @ mix * (0.2 + torch.rand(in_f, generator=g) * 3)
    W = torch.randn(out_f, in_f, generator=g) * 0.1
    return W, X.t() @ X / tokens


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_beats_rtn_on_output_error(bits, group_size):
    W, H = correlated_layer()
    gptq = gptq_quantize(W, H, bits=bits, group_size=group_size, mse=False)
    rtn = gptq_quantize(W, None, bits=bits, group_size=group_size, mse=False)
    assert output_error(W, gptq.dequantize(), H) < 0.8 * output_error(W, rtn.dequantize(), H)


def test_output_error_without_inputs_is_the_weight_error():
    W, _ = correlated_layer()
    W_hat = gptq_quantize(W, None, bits=3, group_size=32, mse=False).dequantize()
    identity = output_error(W, W_hat, torch.eye(W.shape[1]))
    assert output_error(W, W_hat, None) == pytest.approx(identity, rel=1e-5)
    assert 0 < identity < 1


def test_salient_columns_are_never_rounded():
    W, H = correlated_layer()
    salient = torch.tensor([0, 5, 33, 79])
    rtn = gptq_quantize(W, None, bits=2, group_size=32, salient_idx=salient)
    assert torch.equal(rtn.salient_weight, W[:, salient])
    gptq = gptq_quantize(W, H, bits=2, group_size=32, salient_idx=salient)
    # Codes at salient columns are their group's zero point: the dense part is exactly 0 there.
    zeros = gptq.zeros.t()[:, gptq.g_idx.long()[salient]]
    assert torch.equal(gptq.codes[:, salient].float(), zeros)
    # They absorbed GPTQ's error feedback, so they moved away from W.
    assert not torch.allclose(gptq.salient_weight, W[:, salient])


def test_salient_columns_lower_the_error():
    W, H = correlated_layer()
    top = torch.topk(torch.diag(H), 8).indices.sort().values
    plain = gptq_quantize(W, H, bits=3, group_size=32)
    mixed = gptq_quantize(W, H, bits=3, group_size=32, salient_idx=top)
    assert output_error(W, mixed.dequantize(), H) < output_error(W, plain.dequantize(), H)


def test_partial_last_group():
    W, H = correlated_layer(in_f=80)
    r = gptq_quantize(W, H, bits=4, group_size=32, salient_idx=torch.tensor([3, 70]))
    assert r.scales.shape == (3, 64)  # groups of 32, 32 and 16 columns
    assert torch.equal(r.g_idx.long(), torch.arange(80) // 32)


def test_desc_act_records_groups_in_visiting_order():
    W, H = correlated_layer(in_f=80)
    r = gptq_quantize(W, H, bits=4, group_size=32, salient_idx=torch.tensor([1, 2]), desc_act=True)
    # 78 quantized columns make groups of 32, 32 and 14; the 2 salient ones join the last group.
    assert r.scales.shape[0] == 3 and torch.bincount(r.g_idx.long()).tolist() == [32, 32, 16]
    # The columns visited first (largest H_jj) form group 0.
    order = torch.argsort(torch.diag(H), descending=True)
    first = [int(j) for j in order if j not in (1, 2)][:32]
    assert torch.all(r.g_idx[first] == 0)


def test_group_aware_order_keeps_trivial_g_idx_and_helps():
    W, H = correlated_layer(in_f=128, seed=3)
    natural = gptq_quantize(W, H, bits=3, group_size=32, mse=False, group_aware=False)
    gar = gptq_quantize(W, H, bits=3, group_size=32, mse=False, group_aware=True)
    assert torch.equal(gar.g_idx.long(), torch.arange(128) // 32)
    assert output_error(W, gar.dequantize(), H) < output_error(W, natural.dequantize(), H)


def test_dead_inputs_are_zeroed():
    W, H = correlated_layer()
    H[7, :] = 0
    H[:, 7] = 0
    r = gptq_quantize(W, H, bits=4, group_size=32)
    assert torch.all(r.dequantize()[:, 7] == 0)


def test_dampening_raises_itself():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.05]))
    _, damp, _ = inverse_hessian_cholesky(H, 0.01)
    assert damp == pytest.approx(0.1)
    with pytest.raises(QRecoverError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(3), 0.01)


def test_the_walk_measures_the_output_error_it_leaves():
    """GPTQ's column walk leaves tr(D H' D^T) (H' the dampened Hessian) in walked_error, row by row:
    the report's error needs no second out x in^2 product."""
    torch.manual_seed(0)
    X = torch.randn(2048, 192) * torch.rand(192) * 2
    H = X.t() @ X / 2048
    W = torch.randn(40, 192)
    for group_size, salient in ((64, [3, 100]), (-1, []), (32, list(range(8)))):
        r = gptq_quantize(W, H, bits=3, group_size=group_size, salient_idx=torch.tensor(salient, dtype=torch.long))
        D = W - r.dequantize()
        dampened = H + r.damp_added * torch.eye(192)
        assert r.damp_added == pytest.approx(0.01 * float(torch.diag(H).mean()), rel=1e-6)
        assert torch.allclose(r.walked_error, torch.diag(D @ dampened @ D.t()), rtol=1e-4)
        assert output_error(W, None, H, r.walked_error.sum(), r.damp_added) == pytest.approx(
            output_error(W, r.dequantize(), H, damp_added=r.damp_added), rel=1e-4)
