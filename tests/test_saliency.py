import math

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.saliency import METRICS, column_scores, resolve_metric, select_salient


def layer_with_outliers():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * 0.02
    W[:, 10] *= 30  # a column with large weights (large quantization error)
    act = torch.ones(64)
    act[40] = 50.0  # an input feature with huge activations
    act[10] = 3.0
    return W, act


def test_gift_finds_error_times_activation_outliers():
    W, act = layer_with_outliers()
    scores = column_scores(W, act, METRICS["gift"], bits=3)
    assert set(select_salient(scores, 2).tolist()) == {10, 40}


def test_quik_looks_at_activations_only():
    W, act = layer_with_outliers()
    scores = column_scores(W, act, METRICS["quik"], bits=3)
    assert select_salient(scores, 1).tolist() == [40]


def test_wanda_uses_weight_norm():
    W, act = layer_with_outliers()
    act = torch.ones(64)
    assert select_salient(column_scores(W, act, METRICS["wanda"], bits=3), 1).tolist() == [10]


def test_random_is_reproducible_and_sorted():
    W, act = layer_with_outliers()
    a = select_salient(column_scores(W, act, METRICS["random"], 4, torch.Generator().manual_seed(1)), 5)
    b = select_salient(column_scores(W, act, METRICS["random"], 4, torch.Generator().manual_seed(1)), 5)
    assert torch.equal(a, b) and torch.equal(a, a.sort().values)


def test_overrides_of_norms():
    m = resolve_metric("gift", tau=2, gamma=2)
    assert (m.tau, m.rho, m.gamma) == (2.0, math.inf, 2.0)


def test_budget_as_count_fraction_percentage():
    assert QuantConfig(salient="3%").resolve("x", 576).n_salient == 17
    assert QuantConfig(salient=0.03).resolve("x", 1536).n_salient == 46
    assert QuantConfig(salient=128).resolve("x", 576).n_salient == 128
    cfg = QuantConfig(salient=16, overrides={r"down_proj": {"salient": "10%", "bits": 8}})
    spec = cfg.resolve("model.layers.0.mlp.down_proj", 1536)
    assert (spec.n_salient, spec.bits) == (154, 8)
    assert cfg.resolve("model.layers.0.mlp.up_proj", 576).n_salient == 16


def test_more_salient_columns_than_inputs():
    with pytest.raises(QRecoverError, match="576 input features but 600 salient"):
        QuantConfig(salient=600).resolve("model.layers.0.self_attn.q_proj", 576)


def test_gift_and_owq_use_their_own_norms_of_the_same_error():
    """GIFT-SW scores max_i |D_ij| * ||X_j||, OWQ ||D_j||_2 * ||X_j|| (D: the per-row 3-bit error);
    on a random layer they rank different columns first."""
    from qrecover.quant.grid import fit_grid, quantize_dequantize

    torch.manual_seed(1)
    W, act = torch.randn(48, 64), torch.rand(64) * 0.1 + 1
    scale, zero = fit_grid(W, 3, sym=True, mse=True)
    D = (W - quantize_dequantize(W, scale, zero, 7)).abs()
    gift, owq = column_scores(W, act, METRICS["gift"], bits=3), column_scores(W, act, METRICS["owq"], bits=3)
    assert torch.allclose(gift, D.amax(dim=0) * act) and torch.allclose(owq, D.pow(2).sum(0).sqrt() * act)
    assert set(select_salient(gift, 4).tolist()) != set(select_salient(owq, 4).tolist())
