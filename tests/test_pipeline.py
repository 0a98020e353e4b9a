import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.models import architecture, quantizable_linears
from qrecover.nn import QuantLinear
from qrecover.pipeline import capture_inputs, quantize_layer, quantize_model
from qrecover.pipeline.activations import ActivationBudget, Activations

from conftest import tiny_model


def samples(n=6, seqlen=32, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_every_decoder_linear_is_quantized_and_reported():
    model = tiny_model()
    report = quantize_model(model, samples(), QuantConfig(bits=4, group_size=32, salient=4), batch_size=4, progress=False)
    assert all(isinstance(m, QuantLinear) for m in quantizable_linears(model).values())
    modules = [m for layer in report["layers"] for m in layer["modules"]]
    assert len(modules) == 2 * 7
    assert all(m["salient"] == 4 and len(m["salient_idx"]) == 4 and len(m["salient_scores"]) == 4 for m in modules)
    assert all(0 <= m["error"] < 0.1 for m in modules)
    assert report["seconds"] > 0 and report["peak_memory_mb"] > 0


def test_eight_bits_is_nearly_lossless():
    model = tiny_model()
    ids = samples(n=2, seed=9)
    ref = model(ids).logits
    quantize_model(model, samples(), QuantConfig(bits=8, group_size=-1), progress=False)
    assert torch.allclose(model(ids).logits, ref, atol=0.05, rtol=0.05)


def test_replayed_blocks_match_a_plain_forward():
    """The driver's layer outputs (replaying attention and MLP) equal a real forward of the quantized layer."""
    model = tiny_model()
    batches, kwargs = capture_inputs(model, samples(n=4), "cpu", 2)
    layer = model.model.layers[0]
    cfg = QuantConfig(bits=3, group_size=32, salient=2)
    acts = Activations.of(batches, ActivationBudget(2**30), "cpu")
    _, outputs = quantize_layer(layer, architecture(model), "model.layers.0", acts, kwargs[0], cfg, torch.Generator(), torch.float16)
    with torch.no_grad():
        for x, out in zip(batches, outputs):
            direct = layer(x, **kwargs[0])
            direct = direct[0] if isinstance(direct, tuple) else direct
            assert torch.allclose(out, direct, atol=1e-5)


def test_gptq_beats_rtn_end_to_end():
    ids = samples(n=8, seqlen=64)
    test_ids = samples(n=4, seqlen=64, seed=5)
    with torch.no_grad():
        target = tiny_model()(test_ids).logits
    errors = {}
    for method in ("gptq", "rtn"):
        model = tiny_model()
        quantize_model(model, ids, QuantConfig(bits=3, group_size=32, method=method), progress=False)
        with torch.no_grad():
            errors[method] = float(((model(test_ids).logits - target) ** 2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_round_to_nearest_without_salient_columns_needs_no_calibration():
    cfg = QuantConfig(bits=3, group_size=32, method="rtn")
    calibrated, weights_only = tiny_model(), tiny_model()
    quantize_model(calibrated, samples(), cfg, progress=False)
    report = quantize_model(weights_only, None, cfg, progress=False)
    for a, b in zip(calibrated.state_dict().values(), weights_only.state_dict().values()):
        assert torch.equal(a, b)
    assert report["calibration"] is None and report["error"] == "weight"
    assert all(0 < m["error"] < 0.1 for layer in report["layers"] for m in layer["modules"])


@pytest.mark.parametrize("cfg", [
    QuantConfig(bits=4, group_size=32),
    QuantConfig(bits=4, group_size=32, method="rtn", salient=2),
    QuantConfig(bits=4, group_size=32, method="rtn", overrides={"down_proj": {"salient": "5%"}}),
])
def test_calibration_is_required_where_it_is_used(cfg):
    assert cfg.needs_calibration
    with pytest.raises(QRecoverError, match="need calibration samples"):
        quantize_model(tiny_model(), None, cfg, progress=False)


class Interrupted(BaseException):
    pass


@pytest.mark.parametrize("cfg, ids", [
    (QuantConfig(bits=3, group_size=32, salient=3), samples()),
    (QuantConfig(bits=3, group_size=32, salient=3, metric="random"), samples()),
    (QuantConfig(bits=3, group_size=32, method="rtn"), None),
], ids=["calibrated", "random-columns", "weights-only"])
@pytest.mark.parametrize("crash", ["inside-layer", "before-progress"])
def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch, cfg, ids, crash):
    """Interrupted in layer 1, or after layer 1's tensors and the next inputs are saved but before
    its progress is: the resumed model equals the uninterrupted one."""
    import qrecover.pipeline.driver as driver
    import qrecover.pipeline.progress as progress

    whole = tiny_model(layers=3)
    quantize_model(whole, ids, cfg, progress=False)

    def interrupt(*args, **kwargs):
        raise Interrupted

    if crash == "inside-layer":
        real = driver.quantize_layer
        monkeypatch.setattr(driver, "quantize_layer", lambda layer, arch, prefix, *args: (
            interrupt() if prefix.endswith(".1") else real(layer, arch, prefix, *args)))
    else:
        real = progress.StateFile.write
        writes = iter([real, interrupt])  # layer 0's progress is written, layer 1's is not
        monkeypatch.setattr(progress.StateFile, "write", lambda *args: next(writes)(*args))
    with pytest.raises(Interrupted):
        quantize_model(tiny_model(layers=3), ids, cfg, work_dir=tmp_path / "work", progress=False)
    monkeypatch.undo()
    resumed = tiny_model(layers=3)
    report = quantize_model(resumed, ids, cfg, work_dir=tmp_path / "work", progress=False)
    assert [layer["index"] for layer in report["layers"]] == [0, 1, 2]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    with pytest.raises(QRecoverError, match="other settings"):
        quantize_model(tiny_model(layers=3), samples(), QuantConfig(bits=4), work_dir=tmp_path / "work", progress=False)


def test_nan_weights_are_named():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QRecoverError, match=r"model.layers.1.mlp.up_proj contain NaN"):
        quantize_model(model, samples(), QuantConfig(), progress=False)


def test_nan_activations_are_named():
    model = tiny_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(QRecoverError, match="NaN or Inf during calibration"):
        quantize_model(model, samples(), QuantConfig(), progress=False)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(QRecoverError, match="unsupported architecture 'gpt2'"):
        architecture(model)


def test_modules_sharing_inputs_are_solved_together_exactly():
    """q/k/v at k = 0 are one stacked GPTQ problem; each module's result equals its own solve."""
    from qrecover.observer import InputStats
    from qrecover.pipeline import quantize_linears
    from qrecover.quant.gptq import gptq_quantize

    layer = tiny_model().model.layers[0]
    group = {short: layer.get_submodule(short) for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    n = group["self_attn.q_proj"].in_features
    stats = InputStats(n, float("inf"), hessian=True, device="cpu")
    stats.add(torch.randn(300, n) * torch.linspace(0.1, 3, n))
    config = QuantConfig(bits=3, group_size=32)
    solved = quantize_linears(group, "model.layers.0", stats, config, torch.Generator(), torch.float16)
    for short, module in group.items():
        alone = gptq_quantize(module.weight.detach(), stats.hessian, bits=3, group_size=32, mse=config.mse_clip)
        qlinear, report = solved[short]
        assert torch.equal(qlinear.dequantize(), QuantLinear.from_result(alone, None).dequantize())
        assert len(report["solved_with"]) == 2


def test_hessian_is_the_full_symmetric_gram_matrix():
    from qrecover.observer import GRAM_BLOCK, InputStats

    n = GRAM_BLOCK * 2 + 17  # three block rows, the last one partial
    x = torch.randn(2, 50, n)
    stats = InputStats(n, 2.0, hessian=True, device="cpu")
    stats.add(x[0])
    stats.add(x[1])
    flat = x.reshape(-1, n)
    assert torch.allclose(stats.hessian, flat.t() @ flat / 100, atol=1e-4)
    assert torch.allclose(stats.act_norm, flat.norm(dim=0))
