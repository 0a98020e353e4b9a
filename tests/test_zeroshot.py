"""Zero-shot evaluation through lm-eval: local files in the tasks' original formats, metrics, CLI, SmolLM2."""
import json
import re

import pytest
import torch

from qrecover.cli import main
from qrecover.errors import QRecoverError
from qrecover.api import zeroshot
from qrecover.bench.paired import paired_difference
from qrecover.eval.zeroshot import TASKS, parse_tasks, read_task_file

from conftest import ARC_EASY, PIQA, run_forked, tiny_model

HELLASWAG = [
    {"ind": 1, "activity_label": "Baking", "ctx_a": "A man pours flour into a bowl.", "ctx_b": "he",
     "endings": ["adds two eggs.", "drives a car.", "sings to the bowl.", "paints the wall."], "label": 0},
    {"ind": 2, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
     "endings": ["eats the shoes.", "starts to jog down the road.", "flies away.", "sleeps."], "label": "1"},
    {"ind": 3, "activity_label": "Swimming", "ctx_a": "A boy stands at the edge of a pool.", "ctx_b": "he",
     "endings": ["reads a book.", "builds a house.", "dives into the water.", "cooks pasta."], "label": 2},
]
WINOGRANDE = [
    {"qID": "a", "sentence": "The cup fell off the table because the _ was slippery.", "option1": "cup", "option2": "table", "answer": "2"},
    {"qID": "b", "sentence": "Anna gave Maria a gift because _ was kind.", "option1": "Anna", "option2": "Maria", "answer": "1"},
    {"qID": "c", "sentence": "The box did not fit in the car because the _ was too big.", "option1": "box", "option2": "car", "answer": "1"},
]
BOOLQ = [
    {"question": "is the sun a star", "title": "Sun", "answer": True, "passage": "The Sun is the star at the centre of the Solar System."},
    {"question": "is water dry", "title": "Water", "answer": False, "passage": "Water is a liquid that makes things wet."},
    {"question": "do cats bark", "title": "Cat", "answer": False, "passage": "Cats meow and purr; dogs bark."},
]


def specs(files):
    return [f"{task}={path}" for task, path in files.items()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_lines(path, n, tmp_path):
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return write_jsonl(tmp_path / path.name, rows)


@pytest.fixture
def six_files(tmp_path):
    arc = first_lines(ARC_EASY, 5, tmp_path)
    return {
        "arc_easy": arc, "arc_challenge": arc, "piqa": first_lines(PIQA, 7, tmp_path),
        "hellaswag": write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG),
        "winogrande": write_jsonl(tmp_path / "winogrande.jsonl", WINOGRANDE),
        "boolq": write_jsonl(tmp_path / "boolq.jsonl", BOOLQ),
    }


def test_local_files_are_read_in_their_original_formats(six_files):
    arc = read_task_file("arc_easy", six_files["arc_easy"])[0]
    assert arc == {
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {"text": arc["choices"]["text"], "label": ["A", "B", "C", "D"]}, "answerKey": "A",
    }
    assert arc["choices"]["text"][0] == "Sunlight is the source of energy for nearly all ecosystems."
    assert set(read_task_file("piqa", six_files["piqa"])[0]) == {"goal", "sol1", "sol2", "label"}
    assert [r["label"] for r in read_task_file("hellaswag", six_files["hellaswag"])] == [0, 1, 2]
    assert [r["answer"] for r in read_task_file("winogrande", six_files["winogrande"])] == ["2", "1", "1"]
    # lm-eval's boolq reads SuperGLUE's label (choices "no", "yes"); the original release has answer: bool.
    assert [r["label"] for r in read_task_file("boolq", six_files["boolq"])] == [1, 0, 0]


@pytest.mark.parametrize("task, row, fields", [
    ("arc_easy", {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, "question.stem, question.choices [{text, label}], answerKey"),
    # The Hugging Face layout of ARC (question as a string) is not the AI2 release format.
    ("arc_challenge", {"question": "q?", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}, "question.stem"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "goal, sol1, sol2, label"),
    ("hellaswag", {**HELLASWAG[0], "label": 7}, "endings"),
    ("winogrande", {**WINOGRANDE[0], "answer": "3"}, "option1, option2, answer"),
    ("boolq", {"question": "q", "passage": "p", "label": 1}, "question, passage, answer (true or false)"),
])
def test_a_file_in_the_wrong_format_names_the_expected_fields(tmp_path, task, row, fields):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(QRecoverError, match=rf"bad.jsonl line 1 is not a {task} example .*expected JSON lines with the fields .*{re.escape(fields)}"):
        read_task_file(task, path)


def test_unreadable_or_empty_files(tmp_path):
    with pytest.raises(QRecoverError, match="does not exist"):
        read_task_file("piqa", tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(QRecoverError, match="holds no piqa examples"):
        read_task_file("piqa", tmp_path / "empty.jsonl")
    (tmp_path / "text.jsonl").write_text("goal: not json\n")
    with pytest.raises(QRecoverError, match="text.jsonl line 1 is not a piqa example .*goal, sol1, sol2, label"):
        read_task_file("piqa", tmp_path / "text.jsonl")


def loglikelihood(model, tokenizer, context, continuation):
    """Sum of log-probabilities of continuation after context, tokenized as lm-eval does (whole
    string encoded once; the continuation is what follows the context's tokens)."""
    whole = tokenizer(context + continuation).input_ids
    n_context = len(tokenizer(context).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def accuracy_by_hand(model, tokenizer, rows, context, choices, label):
    hits = 0
    for row in rows:
        scores = [loglikelihood(model, tokenizer, context(row), " " + c) for c in choices(row)]
        hits += scores.index(max(scores)) == label(row)
    return hits / len(rows)


def test_all_six_tasks_run_offline_and_score_as_computed_by_hand(six_files, tiny_tokenizer):
    model = tiny_model(vocab=len(tiny_tokenizer))
    result = zeroshot(model, specs(six_files), tokenizer=tiny_tokenizer, limit=4, batch_size=8)
    assert list(result["tasks"]) == list(TASKS) == result["mean_over"]
    for task, entry in result["tasks"].items():
        assert entry["source"] == str(six_files[task]) and entry["examples"] == (3 if task in ("hellaswag", "winogrande", "boolq") else 4)
        assert entry["metric"] == TASKS[task] and entry["score"] == entry[TASKS[task]]
    assert {t for t, m in TASKS.items() if m == "acc_norm"} == {"arc_easy", "arc_challenge", "hellaswag", "piqa"}
    assert "acc_norm" not in result["tasks"]["boolq"]
    assert result["mean"] == pytest.approx(sum(e["score"] for e in result["tasks"].values()) / 6)
    assert result["limit"] == 4 and result["num_fewshot"] == 0

    # The scores are those of the task's own prompt on the file's rows: an odd number of examples
    # so a swapped label mapping (accuracy 1 - acc) cannot agree by chance.
    piqa = zeroshot(model, [f"piqa={six_files['piqa']}"], tokenizer=tiny_tokenizer)["tasks"]["piqa"]
    rows = read_task_file("piqa", six_files["piqa"])
    assert piqa["examples"] == 7
    assert piqa["acc"] == pytest.approx(accuracy_by_hand(
        model, tiny_tokenizer, rows, lambda r: f"Question: {r['goal']}\nAnswer:", lambda r: [r["sol1"], r["sol2"]], lambda r: r["label"]))
    boolq = result["tasks"]["boolq"]["acc"]
    assert boolq == pytest.approx(accuracy_by_hand(
        model, tiny_tokenizer, read_task_file("boolq", six_files["boolq"]),
        lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", lambda r: ["no", "yes"], lambda r: r["label"]))


def test_per_example_results_and_their_paired_difference(six_files, tiny_tokenizer):
    piqa = [f"piqa={six_files['piqa']}"]
    one = zeroshot(tiny_model(vocab=len(tiny_tokenizer)), piqa, tokenizer=tiny_tokenizer, per_example=True)
    other = zeroshot(tiny_model(seed=1, vocab=len(tiny_tokenizer)), piqa, tokenizer=tiny_tokenizer, per_example=True)
    for report in (one, other):
        correct = report["tasks"]["piqa"]["correct"]
        assert len(correct) == 7 and set(correct) <= {0, 1}
        assert sum(correct) / 7 == pytest.approx(report["tasks"]["piqa"]["acc_norm"])
    paired = paired_difference(one, other)["tasks"]["piqa"]
    diff = [a - b for a, b in zip(one["tasks"]["piqa"]["correct"], other["tasks"]["piqa"]["correct"])]
    assert paired["difference"] == pytest.approx(one["tasks"]["piqa"]["score"] - other["tasks"]["piqa"]["score"])
    assert (paired["only_a"], paired["only_b"]) == (diff.count(1), diff.count(-1))
    assert paired_difference(one, one)["tasks"]["piqa"]["stderr"] == 0


def _report(**tasks):
    return {"tasks": {t: {"source": "f.jsonl", "metric": "acc_norm", "correct": c} for t, c in tasks.items()}}


def test_paired_difference_by_hand_and_its_errors():
    a = _report(piqa=[1, 1, 0, 1], arc_easy=[1, 0])
    b = _report(piqa=[1, 0, 0, 0], arc_easy=[0, 1], boolq=[1])
    result = paired_difference(a, b)
    piqa = result["tasks"]["piqa"]
    # d = [0, 1, 0, 1]: mean 0.5, sample variance 1/3, error sqrt(1/3 / 4)
    assert piqa["difference"] == 0.5 and piqa["stderr"] == pytest.approx((1 / 12) ** 0.5)
    assert (piqa["only_a"], piqa["only_b"]) == (2, 0)
    assert result["over"] == ["piqa", "arc_easy"]
    assert result["mean"]["difference"] == pytest.approx(0.25)
    assert result["mean"]["stderr"] == pytest.approx((piqa["stderr"] ** 2 + result["tasks"]["arc_easy"]["stderr"] ** 2) ** 0.5 / 2)

    with pytest.raises(QRecoverError, match="share no task"):
        paired_difference(_report(piqa=[1]), _report(boolq=[1]))
    with pytest.raises(QRecoverError, match="different examples"):
        paired_difference(_report(piqa=[1, 0]), _report(piqa=[1, 0, 1]))
    plain = {"tasks": {"piqa": {"source": "f.jsonl", "metric": "acc_norm", "score": 0.5}}}
    with pytest.raises(QRecoverError, match="--per-example"):
        paired_difference(_report(piqa=[1, 0]), plain)


def test_task_specs_and_bad_arguments(tiny_tokenizer, six_files):
    assert parse_tasks(None) == dict.fromkeys(TASKS)
    assert parse_tasks("piqa=p.jsonl, arc_easy") == {"arc_easy": None, "piqa": "p.jsonl"}
    for bad, message in [(["arc_easy", "mmlu"], "'mmlu' is not NAME or NAME=PATH with NAME one of arc_easy"),
                         (["piqa=a.jsonl", "piqa"], "piqa is given twice"), ("piqa=", "is not NAME or NAME=PATH"), ([], "no zero-shot task")]:
        with pytest.raises(QRecoverError, match=message):
            parse_tasks(bad)
    model = tiny_model(vocab=len(tiny_tokenizer))
    piqa = [f"piqa={six_files['piqa']}"]
    with pytest.raises(QRecoverError, match="limit must be a positive"):
        zeroshot(model, piqa, tokenizer=tiny_tokenizer, limit=0)
    with pytest.raises(QRecoverError, match="needs its tokenizer"):
        zeroshot(model, piqa)


def test_cli_zero_shot_on_local_files_writes_a_report(tiny_model_dir, six_files, capsys):
    argv = ["eval", str(tiny_model_dir), "--task-file", f"arc_easy={six_files['arc_easy']}",
            "--task-file", f"piqa={six_files['piqa']}", "--limit", "2", "--quiet"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tiny_model_dir / "eval_zeroshot.json").read_text())
    assert list(printed["tasks"]) == ["arc_easy", "piqa"] and printed["tasks"]["piqa"]["examples"] == 2

    assert main(["eval", str(tiny_model_dir), "--task-file", f"arc_easy={six_files['piqa']}"]) == 2
    assert "expected JSON lines with the fields question.stem" in capsys.readouterr().err
    # --tasks all with a local file: that task runs on the file, the other five would come from the hub.
    assert main(["eval", str(tiny_model_dir), "--tasks", "all", "--task-file", f"piqa={six_files['arc_easy']}"]) == 2
    assert "expected JSON lines with the fields goal, sol1, sol2, label" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_model_dir), "--task-file", "arc_easy"])


def test_cli_cache_weights_holds_them_and_scores_the_same(tiny_model_dir, six_files, tmp_path, capsys, monkeypatch):
    """--cache-weights dequantizes every quantized linear once, for perplexity and for zero-shot alike."""
    from qrecover.nn import QuantLinear

    ckpt = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--out", str(ckpt), "--bits", "4", "--group-size", "32",
                 "--nsamples", "2", "--seqlen", "32", "--quiet"]) == 0
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    runs = {
        "perplexity": ["eval", str(ckpt), "--dataset", str(text), "--seqlen", "64", "--max-windows", "3", "--quiet"],
        "zero-shot": ["eval", str(ckpt), "--task-file", f"piqa={six_files['piqa']}", "--limit", "4"],
    }
    real, held = QuantLinear.hold_dense, []

    def spy(self, hold, *args):
        held.append(hold)
        return real(self, hold, *args)

    monkeypatch.setattr(QuantLinear, "hold_dense", spy)
    for argv in runs.values():
        capsys.readouterr()
        assert main(argv) == 0
        plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert held == []
        assert main([*argv, "--cache-weights"]) == 0
        cached = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert held == [True] * 14  # 2 layers x 7 linears
        held.clear()
        if "perplexity" in plain:
            assert cached["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)
        else:
            assert cached["tasks"]["piqa"]["acc"] == pytest.approx(plain["tasks"]["piqa"]["acc"])


def test_hub_tasks_offline_get_a_clear_error(tiny_model_dir, tmp_path):
    """Standard lm-eval task names load their datasets from the hub; offline (as every test runs,
    conftest) that fails with advice. In a process of its own: lm-eval's failed hub lookups stay there."""
    args = ["eval", str(tiny_model_dir), "--tasks", "arc_challenge", "--limit", "2", "--quiet"]
    code, err = run_forked("qrecover.cli:main", (args,), tmp_path / "eval.log")
    assert code == 2, err[-2000:]
    assert "allenai/ai2_arc" in err and "--task-file TASK=PATH" in err


def test_smollm2_zero_shot_accuracy_is_above_chance(smollm2_dir):
    """Full-precision SmolLM2-135M on the first 40 ARC-Easy and PIQA examples. Measured: ARC-Easy
    acc_norm 0.45 (chance 0.25), PIQA acc_norm 0.70 (chance 0.5); a broken prompt, label mapping or
    scoring lands near chance (P(>= 16/40 | p = 0.25) is about 3%, P(>= 24/40 | p = 0.5) about 13%)."""
    files = {"arc_easy": ARC_EASY, "piqa": PIQA}
    result = zeroshot(str(smollm2_dir), specs(files), limit=40)
    arc, piqa = result["tasks"]["arc_easy"], result["tasks"]["piqa"]
    assert arc["examples"] == piqa["examples"] == 40
    assert arc["acc_norm"] >= 0.4 and arc["acc"] >= 0.35
    assert piqa["acc_norm"] >= 0.6 and piqa["acc"] >= 0.6
    assert result["mean"] == pytest.approx((arc["acc_norm"] + piqa["acc_norm"]) / 2)
