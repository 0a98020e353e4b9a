import json

import pytest
import torch

from qrecover.config import QuantConfig
from qrecover.errors import QRecoverError
from qrecover.io import load_checkpoint, save_checkpoint
from qrecover.jobs import recover
from qrecover.nn import QuantLinear, SalientLinear
from qrecover.noise import NoiseClock, NoiseConfig
from qrecover.pipeline import quantize_model
from qrecover.quant.gptq import gptq_quantize
from qrecover.recover import RecoverConfig, add_lora, prepare, salient_params
from qrecover.train import TrainConfig, train
from qrecover.train_data import IGNORE, chat_example, load_examples

from conftest import tiny_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def big_layer(bits=4, group_size=128, salient=(5, 700)):
    torch.manual_seed(0)
    W = torch.randn(512, 1024) * 0.05
    result = gptq_quantize(W, None, bits, group_size, True, False, torch.tensor(salient))
    return QuantLinear.from_result(result, None)


def test_noise_has_half_a_step_per_group_and_none_in_eval():
    layer = big_layer()
    layer.enable_noise(NoiseConfig("gaussian"), NoiseClock(seed=1), layer_id=0)
    x = torch.eye(1024)
    with torch.no_grad():
        layer.eval()
        clean = layer(x)
        assert torch.equal(layer(x), clean)  # eval: deterministic, no noise
        layer.train()
        noise = layer(x) - clean  # row j: the noise of input column j
    half_step = layer.scales.float()[layer.g_idx.long()] / 2  # [in, out]
    keep = torch.ones(1024, dtype=torch.bool)
    keep[[5, 700]] = False
    ratio = noise[keep] / half_step[keep]
    for group in range(8):
        rows = (layer.g_idx.long()[keep] == group)
        assert abs(float(ratio[rows].std()) - 1) < 0.03
    assert float(ratio.mean()).__abs__() < 0.01
    assert torch.all(noise[[5, 700]] == 0), "salient columns get no noise"


def test_noise_is_fresh_every_step_and_reproducible():
    layer = big_layer()
    clock = NoiseClock(seed=3)
    layer.enable_noise(NoiseConfig("uniform", scale=2.0), clock, layer_id=4)
    layer.train()
    x = torch.randn(2, 1024)
    with torch.no_grad():
        a = layer(x)
        clock.step = 1
        b = layer(x)
        clock.step = 0
        assert torch.equal(layer(x), a) and not torch.equal(a, b)


def test_backward_uses_the_same_noise_as_forward():
    layer = big_layer()
    layer.enable_noise(NoiseConfig("gaussian"), NoiseClock(), layer_id=0)
    layer.train()
    x = torch.randn(3, 1024, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    # y is linear in x: its gradient is the row sums of the noisy weight, which y itself reveals.
    with torch.no_grad():
        w_noisy = layer(torch.eye(1024))
    assert torch.allclose(x.grad, w_noisy.sum(dim=1).expand(3, -1), atol=1e-4)


@pytest.fixture
def quantized_tiny(tiny_tokenizer, tmp_path):
    model = tiny_model(vocab=len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=3, group_size=32, salient=6)
    quantize_model(model, ids, cfg, progress=False)
    return save_checkpoint(model, tiny_tokenizer, tmp_path / "q3", cfg)


def tiny_setup(path, tokenizer, config):
    model, tok, _ = load_checkpoint(path)
    examples = load_examples("default", tok, 64, limit=64)
    clock = NoiseClock(config.train.seed)
    trainable = prepare(model, config, clock)
    return model, examples, clock, trainable


def test_only_salient_columns_change(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(train=TrainConfig(steps=1, batch_size=2, lr=1e-2))
    model, examples, clock, trainable = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    assert trainable == salient_params(model, config) == 2 * 6 * (80 * 2 + 40 * 2 + 144 * 2) + 2 * 6 * 80
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, examples, 0, config.train, {}, clock=clock, progress=False)
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("salient_weight"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def test_training_lowers_the_loss(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(train=TrainConfig(steps=30, batch_size=4, lr=3e-3, warmup=0.1))
    model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    state = train(model, examples, 0, config.train, {}, clock=clock, progress=False)
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
        assert all((m._held_dense is not None) == cache for m in model.modules() if isinstance(m, QuantLinear))
        train(model, examples, 0, config.train, {}, clock=clock, progress=False)
        runs.append({k: v for k, v in model.state_dict().items() if k.endswith("salient_weight")})
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_resume_reproduces_the_uninterrupted_run(quantized_tiny, tiny_tokenizer, tmp_path, monkeypatch):
    config = RecoverConfig(train=TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=2))
    whole, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    train(whole, examples, 0, config.train, {"a": 1}, clock=clock, progress=False)

    model, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    import qrecover.train as training

    real_save = training.WorkDir.save

    def save_then_crash(self, model, optimizer, state):
        real_save(self, model, optimizer, state)
        if state.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.WorkDir, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(model, examples, 0, config.train, {"a": 1}, work_dir=tmp_path / "work", clock=clock, progress=False)
    monkeypatch.setattr(training.WorkDir, "save", real_save)

    resumed, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    state = train(resumed, examples, 0, config.train, {"a": 1}, work_dir=tmp_path / "work", clock=clock, progress=False)
    assert [r["step"] for r in state.log] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    fresh, examples, clock, _ = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    with pytest.raises(QRecoverError, match="other settings.*a: saved 1, now 2"):
        train(fresh, examples, 0, config.train, {"a": 2}, work_dir=tmp_path / "work", clock=clock, progress=False)


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


def test_bad_training_input(quantized_tiny, tiny_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(QRecoverError, match="holds no records"):
        load_examples(str(empty), tiny_tokenizer, 64)
    with pytest.raises(QRecoverError, match="none of `text`, `messages`"):
        load_examples(str(_write(tmp_path / "odd.jsonl", {"prompt": "x"})), tiny_tokenizer, 64)

    # A checkpoint quantized without salient columns has nothing to train.
    model = tiny_model(vocab=len(tiny_tokenizer))
    cfg = QuantConfig(bits=4, group_size=32)
    quantize_model(model, torch.randint(0, 250, (2, 32)), cfg, progress=False)
    plain = save_checkpoint(model, tiny_tokenizer, tmp_path / "plain", cfg)
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
        train(model, examples, 0, config.train, {}, work_dir=tmp_path / "work", clock=clock, progress=False)
    assert json.loads((tmp_path / "work" / "state.json").read_text())["step"] == 2


def test_lora_baseline_on_a_quantized_model(quantized_tiny, tiny_tokenizer):
    config = RecoverConfig(method="lora", train=TrainConfig(steps=2, batch_size=2, lr=1e-3))
    model, examples, clock, trainable = tiny_setup(quantized_tiny, tiny_tokenizer, config)
    assert trainable == 0
    peft_model = add_lora(model, rank=2)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n == 2 * 2 * (80 * 2 + 2 * (80 + 40) + 80 * 2 + 2 * (80 + 144) + (144 + 80))
    before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_B" in k}
    train(peft_model, examples, 0, config.train, {}, clock=clock, progress=False)
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
    config = RecoverConfig(max_length=64, holdout=6, train=TrainConfig(steps=8, batch_size=4, lr=3e-3))
    result = recover(str(quantized_tiny), tmp_path / "r", config, progress=False)
    held = result["recovery"]["heldout_loss"]
    assert held["after"] < held["before"]
    assert result["recovery"]["examples"] == len(load_examples("default", load_checkpoint(quantized_tiny)[1], 64).items) - 6
    with pytest.raises(QRecoverError, match="cannot hold out"):
        recover(str(quantized_tiny), tmp_path / "r2", RecoverConfig(max_length=64, holdout=10**6), progress=False)


def test_bad_recovery_settings():
    from qrecover.recover import RecoverConfig

    with pytest.raises(QRecoverError, match="noise bits = 5 is not supported"):
        RecoverConfig(noise_bits=5)
    with pytest.raises(QRecoverError, match="noise 'pink' is not one of"):
        RecoverConfig(noise="pink")
