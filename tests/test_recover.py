import json

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover import kernels
from qrecover.errors import QRecoverError
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.api import recover
from qrecover.nn import QuantLinear
from qrecover.pipeline import quantize_model
from qrecover.quant.gptq import gptq_quantize
from qrecover.recovery.config import RecoverConfig, TrainConfig
from qrecover.recovery.data import IGNORE, chat_example, load_examples
from qrecover.recovery.layer import RecoveryLayer, SalientLinear
from qrecover.recovery.model import add_lora, salient_params, start
from qrecover.recovery.noise import NoiseClock, NoiseConfig
from qrecover.recovery.objective import Objective
from qrecover.recovery.trainer import train

from conftest import tiny_model

CE = Objective("ce")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def big_layer(bits=4, group_size=128, salient=(5, 700)):
    torch.manual_seed(0)
    W = torch.randn(512, 1024) * 0.05
    result = gptq_quantize(W, None, bits=bits, group_size=group_size, salient_idx=torch.tensor(salient), mse=False)
    return QuantLinear.from_result(result, None)


def test_noise_has_half_a_step_per_group_and_none_in_eval():
    base = big_layer()
    layer = RecoveryLayer(base, NoiseConfig("gaussian"), NoiseClock(seed=1), layer_id=0)
    x = torch.eye(1024)
    with torch.no_grad():
        layer.eval()
        clean = layer(x)
        assert torch.equal(layer(x), clean)  # eval: deterministic, no noise
        assert torch.allclose(clean, base(x), atol=1e-5)  # and the base layer's own output
        layer.train()
        noise = layer(x) - clean  # row j: the noise of input column j
    half_step = base.scales.float()[base.g_idx.long()] / 2  # [in, out]
    keep = torch.ones(1024, dtype=torch.bool)
    keep[[5, 700]] = False
    ratio = noise[keep] / half_step[keep]
    for group in range(8):
        rows = (base.g_idx.long()[keep] == group)
        assert abs(float(ratio[rows].std()) - 1) < 0.03
    assert float(ratio.mean()).__abs__() < 0.01
    assert torch.all(noise[[5, 700]] == 0), "salient columns get no noise"


def test_backward_sees_the_forward_noise_under_bfloat16_autocast():
    base = big_layer()
    layer = RecoveryLayer(base, NoiseConfig("gaussian"), NoiseClock(seed=2), layer_id=1).train()
    x = torch.randn(3, 1024, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    with torch.no_grad():  # the noisy weight in float32 (the same draw: float32 always, then cast)
        w_noisy = layer(torch.eye(1024)) - layer.salient_weight.t().new_zeros(1)
    expected = w_noisy.sum(dim=1).expand(3, -1)
    # bfloat16 rounding of W + E and of the products, nothing more: another draw would be off by ~1e-1
    assert (x.grad - expected).abs().max() < 0.05 * expected.abs().max()
    other = RecoveryLayer(base, NoiseConfig("gaussian"), NoiseClock(seed=3), layer_id=1).train()
    with torch.no_grad():
        w_other = other(torch.eye(1024))
    assert (w_other.sum(dim=1) - expected[0]).abs().max() > 4 * (x.grad[0] - expected[0]).abs().max()


def test_noise_is_fresh_every_step_and_reproducible():
    layer = big_layer()
    clock = NoiseClock(seed=3)
    layer = RecoveryLayer(layer, NoiseConfig("uniform", scale=2.0), clock, layer_id=4)
    layer.train()
    x = torch.randn(2, 1024)
    with torch.no_grad():
        a = layer(x)
        clock.step = 1
        b = layer(x)
        clock.step = 0
        assert torch.equal(layer(x), a) and not torch.equal(a, b)


def test_backward_uses_the_same_noise_as_forward():
    base = big_layer()
    layer = RecoveryLayer(base, NoiseConfig("gaussian"), NoiseClock(), layer_id=0)
    layer.train()
    x = torch.randn(3, 1024, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    # y is linear in x: its gradient is the row sums of the noisy weight, which y itself reveals.
    with torch.no_grad():
        w_noisy = layer(torch.eye(1024))
    assert torch.allclose(x.grad, w_noisy.sum(dim=1).expand(3, -1), atol=1e-4)


def test_trained_scales_compute_and_merge_as_the_layer_they_write():
    base = big_layer()
    reference = base(x := torch.randn(3, 1024))
    layer = RecoveryLayer(base, NoiseConfig("none"), NoiseClock(), layer_id=0, train_scales=True).train()
    assert torch.allclose(layer(x), reference, atol=1e-4)  # a factor of 1 is the frozen layer
    layer(x).pow(2).sum().backward()
    assert layer.scale_factor.grad.abs().sum() > 0
    with torch.no_grad():
        layer.scale_factor.mul_(1 + 0.1 * torch.randn_like(layer.scale_factor))
        trained = layer(x)
    codes = base.qweight.clone()
    merged = layer.finish()
    assert torch.equal(merged.qweight, codes)  # the integer codes stay
    assert torch.allclose(merged(x), trained, atol=1e-3, rtol=1e-3)  # up to the float16 of the stored scales
    assert not torch.allclose(trained, reference, atol=1e-2)


def test_scales_alone_recover_a_checkpoint_without_salient_columns(tiny_tokenizer, tiny_model_dir, tmp_path):
    model = tiny_model(vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=3, group_size=32, salient=0)
    quantize_model(model, torch.randint(0, len(tiny_tokenizer), (4, 64), generator=torch.Generator().manual_seed(0)), cfg, progress=False)
    path = save_checkpoint(model, tiny_tokenizer, tmp_path / "q3k0", cfg, source=str(tiny_model_dir))
    with pytest.raises(QRecoverError, match="no salient columns.*--scale-lr"):
        recover(str(path), tmp_path / "none", RecoverConfig(max_length=64), progress=False)
    config = RecoverConfig(noise="none", max_length=64, holdout=6, train=TrainConfig(steps=8, batch_size=4, lr=3e-3, scale_lr=1e-2))
    result = recover(str(path), tmp_path / "scales", config, progress=False)
    held = result["recovery"]["heldout_loss"]
    assert held["objective"] == "kd" and held["after"] < 0.95 * held["before"]
    before, after = load_checkpoint(path)[0].state_dict(), load_checkpoint(tmp_path / "scales")[0].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    with pytest.raises(QRecoverError, match="not quantized"):
        recover(str(tiny_model_dir), tmp_path / "fp", RecoverConfig(noise="none", salient=4, max_length=64, train=TrainConfig(scale_lr=1e-3)), progress=False)


def tiny_setup(path, tokenizer, config):
    model, tok, _ = load_checkpoint(path)
    examples = load_examples("default", tok, 64, limit=64)
    clock = NoiseClock(config.train.seed)
    trainable = start(model, config, clock)
    return model, examples, clock, trainable


def test_only_salient_columns_change(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(train=TrainConfig(steps=1, batch_size=2, lr=1e-2))
    model, examples, clock, trainable = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    assert trainable == salient_params(model, config) == 2 * 6 * (80 * 2 + 40 * 2 + 144 * 2) + 2 * 6 * 80
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, examples, 0, config.train, CE, {}, clock=clock, progress=False)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("salient_weight") and ".base." not in key:  # the trainable copy, not the frozen base
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def test_training_lowers_the_loss(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(train=TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup=0.1))
    model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    state = train(model, examples, 0, config.train, CE, {}, clock=clock, progress=False)
    losses = [r["loss"] for r in state.log]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


@pytest.mark.parametrize("noise", ["gaussian", "none"])
def test_cached_weights_train_exactly_like_unpacked_ones(quantized_tiny, tiny_tokenizer, noise):
    from qrecover.nn import hold_dense_weights

    config = RecoverConfig(noise=noise, train=TrainConfig(steps=3, batch_size=2, lr=1e-2))
    runs = []
    for cache in (False, True):
        model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
        hold_dense_weights(model, cache)
        assert all(kernels.holds_dense(m) == cache for m in model.modules() if isinstance(m, QuantLinear))
        train(model, examples, 0, config.train, CE, {}, clock=clock, progress=False)
        runs.append({k: v for k, v in model.state_dict().items() if k.endswith("salient_weight")})
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_resume_reproduces_the_uninterrupted_run(quantized_tiny, tiny_tokenizer, tmp_path, monkeypatch):
    config = RecoverConfig(noise="gaussian", train=TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=2))
    whole, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    train(whole, examples, 0, config.train, CE, {"a": 1}, clock=clock, progress=False)

    model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    import qrecover.recovery.trainer as training

    real_save = training.WorkDir.save

    def save_then_crash(self, model, optimizer, state):
        real_save(self, model, optimizer, state)
        if state.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.WorkDir, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(model, examples, 0, config.train, CE, {"a": 1}, work_dir=tmp_path / "work", clock=clock, progress=False)
    monkeypatch.setattr(training.WorkDir, "save", real_save)

    resumed, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    state = train(resumed, examples, 0, config.train, CE, {"a": 1}, work_dir=tmp_path / "work", clock=clock, progress=False)
    assert [r["step"] for r in state.log] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    fresh, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    with pytest.raises(QRecoverError, match="other settings.*a: saved 1, now 2"):
        train(fresh, examples, 0, config.train, CE, {"a": 2}, work_dir=tmp_path / "work", clock=clock, progress=False)


def test_instruction_loss_covers_exactly_the_response(tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = CHATML
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."}]
    example, cut = chat_example(tok, messages, 512)
    labels = example["labels"]
    assert not cut
    labeled = labels != IGNORE
    assert tok.decode(example["input_ids"][labeled]) == "Blue, like the sea.<|im_end|>\n"
    # Everything before the response is masked, everything from it on is not.
    first = int(labeled.nonzero()[0])
    assert tok.decode(example["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert labeled[first:].all()

    two_turns = messages + [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    example, _ = chat_example(tok, two_turns, 512)
    assert tok.decode(example["input_ids"][example["labels"] != IGNORE]) == "Blue, like the sea.<|im_end|>\nRed.<|im_end|>\n"

    example, cut = chat_example(tok, messages, 8)
    assert cut and len(example["input_ids"]) == 8


def test_instruction_file_counts_truncation(tiny_tokenizer, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "Say it", "input": "", "output": "ok " * n}) for n in (2, 200)))
    examples = load_examples(str(data), tiny_tokenizer, 64)
    assert examples.kind == "chat" and examples.truncated == 1 and len(examples.items) == 2


def test_bad_training_input(quantized_tiny, tiny_tokenizer, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(QRecoverError, match="holds no records"):
        load_examples(str(empty), tiny_tokenizer, 64)
    with pytest.raises(QRecoverError, match="none of the fields qrecover reads"):
        load_examples(str(_write(tmp_path / "odd.jsonl", {"prompt": "x"})), tiny_tokenizer, 64)

    # A checkpoint quantized without salient columns has nothing to train.
    model = tiny_model(vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(model, torch.randint(0, 250, (2, 32)), cfg, progress=False)
    plain = save_checkpoint(model, tiny_tokenizer, tmp_path / "plain", cfg, source=str(tmp_path / "tiny"))
    with pytest.raises(QRecoverError, match="no salient columns: nothing to train"):
        recover(str(plain), tmp_path / "r", RecoverConfig(max_length=64, train=TrainConfig(steps=1)), progress=False)


def test_nan_loss_stops_and_names_the_step(quantized_tiny, tiny_tokenizer, tmp_path):
    config = RecoverConfig(train=TrainConfig(steps=4, batch_size=2, save_every=2))
    model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output

    model.model.norm.register_forward_hook(poison)
    with pytest.raises(QRecoverError, match=r"loss became nan at step 4; stopped \(the last good checkpoint is step 2"):
        train(model, examples, 0, config.train, CE, {}, work_dir=tmp_path / "work", clock=clock, progress=False)
    assert json.loads((tmp_path / "work" / "state.json").read_text())["step"] == 2


def test_lora_baseline_on_a_quantized_model(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(method="lora", train=TrainConfig(steps=2, batch_size=2, lr=1e-3))
    model, examples, clock, trainable = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    assert trainable == 0
    peft_model = add_lora(model, rank=2)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n == 2 * 2 * (80 * 2 + 2 * (80 + 40) + 80 * 2 + 2 * (80 + 144) + (144 + 80))
    before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_B" in k}
    train(peft_model, examples, 0, config.train, CE, {}, clock=clock, progress=False)
    assert any(not torch.equal(v, peft_model.state_dict()[k]) for k, v in before.items())


def test_unquantized_model_recovers_and_merges(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = RecoverConfig(salient=8, max_length=64, train=TrainConfig(steps=3, batch_size=2, lr=1e-2))
    result = recover(str(tiny_model_dir), tmp_path / "ft", config, progress=False)
    out = tmp_path / "ft"
    assert result["recovery"]["trainable_params"] == 2 * 8 * (80 * 2 + 40 * 2 + 144 * 2 + 80)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, a), b in zip(merged.named_parameters(), base.parameters()) if not torch.equal(a, b)]
    assert changed and all("proj" in n for n in changed)
    # Only 8 input columns of each projection moved.
    q_new, q_old = merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    assert int((q_new != q_old).any(dim=0).sum()) == 8
    log = json.loads((out / "recovery_log.json").read_text())
    assert len(log["log"]) == 3 and (out / "recovery_loss.png").stat().st_size > 1000


def test_salient_linear_merges_exactly():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = SalientLinear(linear, torch.tensor([1, 9, 40]), step_bits=4)
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)
    with torch.no_grad():
        layer.salient_weight += 1.0
    assert torch.allclose(layer.merged()(x), layer(x), atol=1e-5)


def _write(path, record):
    path.write_text(json.dumps(record) + "\n")
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_unquantized_baselines_export_ordinary_models(method, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = RecoverConfig(method=method, salient=8, max_length=64, train=TrainConfig(steps=2, batch_size=2, lr=1e-2))
    result = recover(str(tiny_model_dir), tmp_path / method, config, progress=False)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
    if method == "lora":  # about as many parameters as 8 salient columns per projection
        assert abs(result["recovery"]["trainable_params"] / (2 * 8 * (80 * 2 + 40 * 2 + 144 * 2 + 80)) - 1) < 0.5
    else:
        assert result["recovery"]["trainable_params"] == sum(p.numel() for p in base.parameters())


def test_holdout_examples_measure_a_held_out_loss(quantized_tiny, tmp_path):
    config = RecoverConfig(objective="ce", max_length=64, holdout=6, train=TrainConfig(steps=8, batch_size=4, lr=3e-3))
    result = recover(str(quantized_tiny), tmp_path / "r", config, progress=False)
    held = result["recovery"]["heldout_loss"]
    assert held["after"] < held["before"]
    assert result["recovery"]["examples"] == len(load_examples("default", load_checkpoint(quantized_tiny)[1], 64).items) - 6
    with pytest.raises(QRecoverError, match="cannot hold out"):
        recover(str(quantized_tiny), tmp_path / "r2", RecoverConfig(max_length=64, holdout=10**6), progress=False)


def test_bad_recovery_settings():
    with pytest.raises(QRecoverError, match="noise bits = 5 is not supported"):
        RecoverConfig(noise_bits=5)
    with pytest.raises(QRecoverError, match="noise 'pink' is not one of"):
        RecoverConfig(noise="pink")
    with pytest.raises(QRecoverError, match="scale-lr.*--noise none"):
        RecoverConfig(noise="gaussian", train=TrainConfig(scale_lr=1e-3))
    with pytest.raises(QRecoverError, match="scale learning rate -1"):
        TrainConfig(scale_lr=-1)


@pytest.fixture
def other_teacher(tiny_tokenizer, tmp_path):
    """Another random tiny LLaMA with the same tokenizer: a teacher far from quantized_tiny."""
    path = tmp_path / "teacher"
    tiny_model(seed=7, vocab=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_distillation_pulls_the_student_toward_its_teacher(quantized_tiny, other_teacher, tmp_path):
    config = RecoverConfig(teacher=str(other_teacher), noise="none", max_length=64, holdout=6,
                           train=TrainConfig(steps=8, batch_size=4, lr=3e-3))
    result = recover(str(quantized_tiny), tmp_path / "kd", config, progress=False)
    summary = result["recovery"]
    assert summary["objective_used"] == "kd" and summary["teacher"]["model"] == str(other_teacher)
    held = summary["heldout_loss"]
    assert held["objective"] == "kd" and held["after"] < 0.9 * held["before"]


def test_bfloat16_distillation_follows_the_float32_loss_curve(quantized_tiny, other_teacher, tmp_path, monkeypatch, capsys):
    """bf16 autocast (the head included) against float32, same start, data and steps: every step's
    loss within 0.5% (measured: 0.07%), and both lower the held-out KL alike. On a CPU without
    bfloat16 arithmetic (as here, made so) auto trains in float32, and an explicit bf16 says it is emulated."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    runs = {}
    for precision in ("auto", "bf16"):
        config = RecoverConfig(teacher=str(other_teacher), noise="none", max_length=64, holdout=6,
                               train=TrainConfig(steps=6, batch_size=4, lr=3e-3, precision=precision))
        result = recover(str(quantized_tiny), tmp_path / precision, config, progress=False)
        log = json.loads((tmp_path / precision / "recovery_log.json").read_text())["log"]
        runs[precision] = ([r["loss"] for r in log], result["recovery"]["heldout_loss"])
        assert result["recovery"]["precision_used"] == ("fp32" if precision == "auto" else "bf16")
        assert ("bf16 is emulated here" in capsys.readouterr().err) == (precision == "bf16")
    (fp32, held32), (bf16, held16) = runs["auto"], runs["bf16"]
    assert fp32 != bf16  # bf16 really ran
    assert bf16 == pytest.approx(fp32, rel=0.005)
    assert held16["after"] == pytest.approx(held32["after"], rel=0.005) and held16["after"] < 0.9 * held16["before"]


def test_auto_precision_is_bf16_where_the_cpu_multiplies_bfloat16(monkeypatch):
    train = TrainConfig(precision="auto")
    for amx, avx512_bf16 in [(False, False), (True, False), (False, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert train.bf16_on("cpu") == (amx or avx512_bf16)
        assert TrainConfig(precision="bf16").bf16_on("cpu") and not TrainConfig(precision="fp32").bf16_on("cpu")


def test_under_bfloat16_the_head_multiplies_in_bfloat16_and_the_losses_see_float32():
    """The head is a fifth of a SmolLM2 step's work: under bf16 it must not fall back to float32
    (what made a bf16 distillation step 0.71x an fp32 one instead of 0.56x)."""
    from qrecover.recovery.objective import float32_logits

    model, seen = tiny_model(), []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = float32_logits(model, ids, torch.ones_like(ids))
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    loss = Objective("ce", bf16=True)(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert loss.dtype == torch.float32 and seen[-1] == torch.bfloat16


def test_the_default_teacher_is_the_recorded_source(quantized_tiny, tiny_model_dir, tmp_path):
    config = RecoverConfig(noise="none", max_length=64, train=TrainConfig(steps=1, batch_size=2))
    summary = recover(str(quantized_tiny), tmp_path / "kd", config, progress=False)["recovery"]
    assert summary["teacher"]["model"] == str(tiny_model_dir)
    qc = json.loads((tmp_path / "kd" / "config.json").read_text())["quantization_config"]
    assert qc["source_model"] == str(tiny_model_dir)  # kept, so the recovered checkpoint can distill again


def test_a_full_teacher_cache_trains_exactly_like_the_live_teacher(quantized_tiny, other_teacher, tiny_tokenizer, tmp_path):
    runs = []
    for cache in (None, tmp_path / "cache"):
        config = RecoverConfig(teacher=str(other_teacher), teacher_cache=cache and str(cache), teacher_topk=len(tiny_tokenizer),
                               noise="none", max_length=64,
                               # float32 on every CPU: under bfloat16 the two teachers' roundings differ
                               train=TrainConfig(steps=3, batch_size=2, lr=1e-2, precision="fp32"))
        recover(str(quantized_tiny), tmp_path / f"kd{len(runs)}", config, progress=False)
        runs.append(load_checkpoint(tmp_path / f"kd{len(runs)}")[0].state_dict())
    for key, value in runs[0].items():
        assert torch.allclose(runs[1][key].float(), value.float(), atol=2e-3), key
    assert (tmp_path / "cache" / "teacher_topk.safetensors").is_file()


def test_a_teacher_cache_of_another_teacher_is_refused(quantized_tiny, other_teacher, tiny_model_dir, tmp_path):
    cache = str(tmp_path / "cache")
    config = RecoverConfig(teacher=str(other_teacher), teacher_cache=cache, noise="none", max_length=64, train=TrainConfig(steps=1, batch_size=2))
    recover(str(quantized_tiny), tmp_path / "a", config, progress=False)
    config = RecoverConfig(teacher=str(tiny_model_dir), teacher_cache=cache, noise="none", max_length=64, train=TrainConfig(steps=1, batch_size=2))
    with pytest.raises(QRecoverError, match="teacher cache .* was made with another teacher"):
        recover(str(quantized_tiny), tmp_path / "b", config, progress=False)


def test_kd_top_k_is_the_kl_of_the_coarsened_distributions():
    from qrecover.recovery.objective import kl_full, kl_topk

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 50), torch.randn(2, 3, 50) * 2
    logp = torch.log_softmax(teacher, -1)
    full = kl_full(student, teacher)
    top = logp.topk(50, -1)
    assert torch.allclose(kl_topk(student, top.values, top.indices), full, atol=1e-5)  # k = vocab: exact
    top = logp.topk(5, -1)
    coarse = kl_topk(student, top.values, top.indices)
    assert (coarse <= full + 1e-6).all() and (coarse > 0).all()  # coarsening never raises a KL


def test_mixtures_take_examples_by_weight(tiny_tokenizer, tmp_path):
    from qrecover.recovery.data import mix, parse_sources

    chat = tmp_path / "sft.jsonl"
    chat.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "output": "ok"}) for i in range(40)))
    assert parse_sources("default") == [("default", 1.0)]
    sources = parse_sources(f"default:0.75,{chat}:0.25")
    assert sources == [("default", 0.75), (str(chat), 0.25)]
    parts = [(load_examples(s, tiny_tokenizer, 64), w) for s, w in sources]
    mixed = mix(parts)
    kinds = [int((e["labels"] == IGNORE).any()) for e in mixed.items]  # chat examples mask their prompt
    assert mixed.kind == "mixed" and sum(kinds) == 40 and len(mixed.items) == 160
    for bad in ("default:x", "default:0.5,self", "default:-1,self:1"):
        with pytest.raises(QRecoverError, match="is not SOURCE:WEIGHT"):
            parse_sources(bad)


def test_bad_distillation_input(quantized_tiny, tiny_tokenizer, tmp_path):
    with pytest.raises(QRecoverError, match="at least 1 sequence"):
        RecoverConfig(data="self", self_samples=0)
    with pytest.raises(QRecoverError, match="objective 'mse' is not one of"):
        RecoverConfig(objective="mse")
    # A teacher with another vocabulary.
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tiny_model(vocab=len(tiny_tokenizer)).save_pretrained(other)
    tok = AutoTokenizer.from_pretrained(str(quantized_tiny))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    config = RecoverConfig(teacher=str(other), noise="none", max_length=64, train=TrainConfig(steps=1, batch_size=2))
    with pytest.raises(QRecoverError, match="has another tokenizer than the student"):
        recover(str(quantized_tiny), tmp_path / "r", config, progress=False)
    # An ordinary model has no recorded teacher.
    with pytest.raises(QRecoverError, match="distillation needs a teacher"):
        recover(str(other), tmp_path / "r2", RecoverConfig(objective="kd", salient=4, max_length=64, train=TrainConfig(steps=1)), progress=False)


def test_noise_scale_auto_keeps_the_pilot_with_the_lowest_held_out_loss(quantized_tiny, tmp_path):
    config = RecoverConfig(objective="ce", noise="gaussian", noise_scale="auto", pilot_steps=2, max_length=64, holdout=4,
                           train=TrainConfig(steps=2, batch_size=2, lr=3e-3))
    summary = recover(str(quantized_tiny), tmp_path / "auto", config, progress=False)["recovery"]
    pilots = summary["noise_pilots"]
    assert [p["noise_scale"] for p in pilots] == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert summary["noise_scale_used"] == min(pilots, key=lambda p: p["heldout_loss"])["noise_scale"]
    # every pilot starts from the same columns: the noiseless pilot equals a plain 2-step run's held-out loss
    plain = RecoverConfig(objective="ce", noise="none", max_length=64, holdout=4, train=TrainConfig(steps=2, batch_size=2, lr=3e-3))
    again = recover(str(quantized_tiny), tmp_path / "plain", plain, progress=False)["recovery"]["heldout_loss"]["after"]
    assert abs(pilots[0]["heldout_loss"] - again) < 1e-5
    with pytest.raises(QRecoverError, match="add --holdout"):
        recover(str(quantized_tiny), tmp_path / "x", RecoverConfig(objective="ce", noise="gaussian", noise_scale="auto", max_length=64), progress=False)
    with pytest.raises(QRecoverError, match="with --noise gaussian or uniform"):
        recover(str(quantized_tiny), tmp_path / "x", RecoverConfig(objective="ce", noise_scale="auto", holdout=4, max_length=64), progress=False)


def test_self_written_text_is_made_once_and_reused(quantized_tiny, tiny_model_dir, tmp_path, monkeypatch):
    from qrecover.recovery import teacher as teacher_module

    config = RecoverConfig(data="self", self_samples=3, objective="ce", noise="none", max_length=32, teacher_cache=str(tmp_path / "cache"),
                           train=TrainConfig(steps=1, batch_size=2))
    summary = recover(str(quantized_tiny), tmp_path / "a", config, progress=False)["recovery"]
    files = list((tmp_path / "cache").glob("self-*.jsonl"))
    assert len(files) == 1 and summary["examples"] >= 1
    settings = json.loads(files[0].with_suffix(".json").read_text())
    assert settings["samples"] == 3 and settings["teacher_spec"] == str(tiny_model_dir) and settings["teacher"]
    assert len(files[0].read_text().splitlines()) == settings["sequences"]

    monkeypatch.setattr(teacher_module.Teacher, "model", property(lambda self: pytest.fail("the teacher wrote again")))
    recover(str(quantized_tiny), tmp_path / "b", config, progress=False)  # reuses the file


def test_the_fused_kl_matches_autograd_of_the_formula():
    from qrecover.recovery.objective import kl_full

    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 40, requires_grad=True), torch.randn(2, 5, 40) * 3
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    weights = torch.rand(2, 5)
    ((log_p.exp() * (log_p - log_q)).sum(-1) * weights).sum().backward()
    expected = student.grad.clone()
    student.grad = None
    kl = kl_full(student, teacher)
    assert torch.allclose(kl, (log_p.exp() * (log_p - log_q)).sum(-1).detach(), atol=1e-6)
    (kl * weights).sum().backward()
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_the_memory_plan_counts_what_the_model_holds(quantized_tiny, tiny_tokenizer, tiny_model_dir):
    """Packed weights and trainable values as the loaded checkpoint holds them, and the same plan from
    the model's config on the meta device with the QuantConfig it was quantized with."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from qrecover.recovery.memory import memory_plan

    config = RecoverConfig(train=TrainConfig(steps=1, batch_size=2, scale_lr=1e-3))
    model, _, _ = load_checkpoint(quantized_tiny)
    plan = memory_plan(model, config)
    held = sum(t.nbytes for m in model.modules() if isinstance(m, QuantLinear) for t in m.state_dict().values())
    assert plan["packed_weights"] == held
    _, _, _, trainable = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    assert plan["trainable"] == 16 * trainable
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    from_shapes = memory_plan(meta, config, QuantConfig(bits=3, group_size=32, salient=6))
    assert from_shapes == plan
