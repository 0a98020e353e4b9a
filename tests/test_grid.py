import torch

from qrecover.quant.grid import fit_grid, quantize, quantize_dequantize


def test_symmetric_grid_zero_and_range():
    w = torch.randn(16, 64)
    for bits in (2, 3, 4, 8):
        scale, zero = fit_grid(w, bits, sym=True, mse=False)
        assert torch.all(zero == 2 ** (bits - 1))
        codes = quantize(w, scale, zero, 2**bits - 1)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        # Without clipping every weight inside the grid is within half a step.
        inside = (w / scale).abs() <= 2 ** (bits - 1) - 1
        err = (quantize_dequantize(w, scale, zero, 2**bits - 1) - w).abs()
        assert torch.all(err[inside] <= scale.expand_as(w)[inside] / 2 + 1e-6)


def test_scales_are_float16_values():
    scale, _ = fit_grid(torch.randn(8, 32) * 0.01, 4, sym=True, mse=True)
    assert torch.equal(scale, scale.half().float())


def test_mse_clip_lowers_error_on_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 128))
    plain = fit_grid(w, 3, sym=True, mse=False)
    clipped = fit_grid(w, 3, sym=True, mse=True)
    err = lambda g: ((quantize_dequantize(w, *g, 7) - w) ** 2).sum()
    assert err(clipped) < 0.8 * err(plain)


def test_asymmetric_zero_fits_v1_checkpoints():
    w = torch.rand(8, 32)  # all positive: the ideal zero point would be 0
    scale, zero = fit_grid(w, 4, sym=False, mse=False)
    assert torch.all(zero >= 1), "GPTQ v1 stores zero - 1: a zero point of 0 cannot be saved"


def test_empty_rows_get_a_valid_grid():
    w = torch.zeros(4, 16)
    scale, zero = fit_grid(w, 4, sym=True, mse=True)
    assert torch.all(scale > 0)
    assert torch.equal(quantize_dequantize(w, scale, zero, 15), w)


def test_large_blocks_are_split_without_changing_the_result():
    w = torch.randn(3000, 600)
    whole = fit_grid(w, 4, sym=True, mse=True)
    rows = torch.cat([fit_grid(w[i : i + 1], 4, sym=True, mse=True)[0] for i in range(0, 3000, 500)])
    assert torch.equal(whole[0][::500], rows)
