"""Zero-shot accuracy through lm-eval (EleutherAI's LM Evaluation Harness), the way GIFT-SW reports it.

The six tasks of the paper run as lm-eval's own tasks (same prompts, same log-likelihood scoring);
each reports the metric that literature uses for it (`TASKS`), and the result carries their mean.
A task either downloads its standard dataset from the Hugging Face hub, or, given a local file in
the task's original release format, runs on that file offline: the rows are checked and mapped to
the fields lm-eval's task reads, and handed to the standard task config in place of its dataset.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import QRecoverError

# Task -> the metric reported: length-normalized accuracy for ARC, HellaSwag and PIQA, plain
# accuracy for WinoGrande and BoolQ, as in the quantization literature GIFT-SW compares with.
TASKS = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
}
LOCAL_GROUP = "qrecover_local_files"  # lm-eval group that carries the local-file overrides
# Where the six tasks' configs live in lm-eval's tasks/ folder. A TaskManager indexes every task
# file it may read (thousands: about 25 s on 2 cores); these folders are all the six need.
TASK_FOLDERS = ("arc", "hellaswag", "piqa", "winogrande", "super_glue/boolq")


@dataclass(frozen=True)
class LocalFormat:
    fields: str  # what a row of the original release holds, for error messages
    convert: Callable[[dict], dict]  # original row -> the row lm-eval's standard task reads


def _field(row: dict, key: str, kind):
    value = row[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value


def _arc(row: dict) -> dict:
    question = _field(row, "question", dict)
    choices = _field(question, "choices", list)
    labels = [_field(c, "label", str) for c in choices]
    answer = _field(row, "answerKey", str)
    if answer not in labels:
        raise ValueError(f"answerKey {answer!r} is none of the choice labels {labels}")
    texts = [_field(c, "text", str) for c in choices]
    return {"question": _field(question, "stem", str), "choices": {"text": texts, "label": labels}, "answerKey": answer}


def _piqa(row: dict) -> dict:
    label = _field(row, "label", int)
    if label not in (0, 1):
        raise ValueError(f"label is {label}")
    return {"goal": _field(row, "goal", str), "sol1": _field(row, "sol1", str), "sol2": _field(row, "sol2", str), "label": label}


def _hellaswag(row: dict) -> dict:
    endings = [str(e) for e in _field(row, "endings", list)]
    label = int(_field(row, "label", (int, str)))
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is not the index of one of {len(endings)} endings")
    context = {key: _field(row, key, str) for key in ("activity_label", "ctx_a", "ctx_b")}
    return {**context, "endings": endings, "label": label}


def _winogrande(row: dict) -> dict:
    answer = str(_field(row, "answer", (str, int)))
    if answer not in ("1", "2"):
        raise ValueError(f"answer is {answer!r}")
    sentence = _field(row, "sentence", str)
    if "_" not in sentence:
        raise ValueError("the sentence has no _ blank")
    return {"sentence": sentence, "option1": _field(row, "option1", str), "option2": _field(row, "option2", str), "answer": answer}


def _boolq(row: dict) -> dict:
    # lm-eval's boolq reads SuperGLUE's label: 1 = yes.
    return {"question": _field(row, "question", str), "passage": _field(row, "passage", str), "label": int(_field(row, "answer", bool))}


_ARC = LocalFormat("question.stem, question.choices [{text, label}], answerKey (AI2 ARC jsonl)", _arc)
LOCAL_FORMATS = {
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "hellaswag": LocalFormat("activity_label, ctx_a, ctx_b, endings [...], label (index of the right ending)", _hellaswag),
    "piqa": LocalFormat("goal, sol1, sol2, label (0 or 1)", _piqa),
    "winogrande": LocalFormat('sentence (with a _ blank), option1, option2, answer ("1" or "2")', _winogrande),
    "boolq": LocalFormat("question, passage, answer (true or false)", _boolq),
}


def read_task_file(task: str, path) -> list[dict]:
    """The rows of a local .jsonl file in `task`'s original format, as lm-eval's task reads them."""
    fmt, path = LOCAL_FORMATS[task], Path(path)
    if not path.is_file():
        raise QRecoverError(f"{task} file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(fmt.convert(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                problem = f"no field {e}" if isinstance(e, KeyError) else str(e)
                raise QRecoverError(
                    f"{path} line {n} is not a {task} example in its original format ({problem}); "
                    f"expected JSON lines with the fields {fmt.fields}"
                ) from e
    if not rows:
        raise QRecoverError(f"{path} holds no {task} examples")
    return rows


def _as_dataset(rows: list[dict], **_lm_eval_metadata):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _local_task(task: str, path) -> dict:
    """Overrides that make lm-eval's standard `task` read the rows of a local file."""
    rows = read_task_file(task, path)
    return {
        "task": task, "custom_dataset": functools.partial(_as_dataset, rows), "dataset_path": str(path),
        "dataset_name": None, "training_split": None, "validation_split": None, "test_split": "test",
    }


def parse_tasks(tasks) -> dict:
    """{task: local file or None} of task specs "NAME" (standard dataset) or "NAME=PATH" (local
    file), as a list or a comma-separated string; None means the six tasks from the hub. In TASKS order."""
    if tasks is None:
        return dict.fromkeys(TASKS)
    specs = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    chosen = {}
    for spec in filter(None, (str(s).strip() for s in specs)):
        name, sep, path = spec.partition("=")
        if name not in TASKS or (sep and not path):
            raise QRecoverError(f"zero-shot task {spec!r} is not NAME or NAME=PATH with NAME one of {', '.join(TASKS)}")
        if name in chosen:
            raise QRecoverError(f"zero-shot task {name} is given twice")
        chosen[name] = path or None
    if not chosen:
        raise QRecoverError(f"no zero-shot task given; choose from {', '.join(TASKS)}")
    return {t: chosen[t] for t in TASKS if t in chosen}


def zeroshot(
    model, tasks=None, *, tokenizer=None, limit: int | None = None, batch_size: int = 32, per_example: bool = False,
    name: str | None = None,
) -> dict:
    """Zero-shot accuracy of a model on lm-eval tasks, with the paper's metric per task and their mean.

    model: an in-memory model with its `tokenizer` (qrecover.zeroshot also takes a checkpoint or model spec).
    tasks: "NAME" runs lm-eval's task on its standard dataset (Hugging Face hub), "NAME=PATH" on a
    local .jsonl in the task's original format, offline (see parse_tasks; default: all six, hub).
    limit: only the first N examples of each task.
    per_example: each task also lists, in file order, whether each example scored (1) or not (0) by
    its metric: what a paired comparison of two models on the same questions needs (bench.paired).
    """
    chosen = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise QRecoverError(f"limit must be a positive number of examples, not {limit}")
    specs = [t for t, path in chosen.items() if path is None]
    local = [_local_task(t, path) for t, path in chosen.items() if path is not None]
    if local:
        specs.append({"group": LOCAL_GROUP, "task": local})
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        import lm_eval.tasks
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise QRecoverError(f"zero-shot evaluation needs lm-eval ({e}): pip install 'qrecover[zeroshot]'") from e

    if tokenizer is None:
        raise QRecoverError("an in-memory model needs its tokenizer: zeroshot(model, ..., tokenizer=tokenizer)")
    name = name or getattr(model.config, "name_or_path", "") or type(model).__name__
    start = time.perf_counter()
    tasks_root = Path(lm_eval.tasks.__file__).parent
    task_manager = TaskManager(include_defaults=False, include_path=[str(tasks_root / d) for d in TASK_FOLDERS])
    try:
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=specs, num_fewshot=0, limit=limit, task_manager=task_manager, log_samples=per_example,
        )
    except ConnectionError as e:  # what datasets raises for an unreachable (or offline) hub
        raise QRecoverError(
            f"could not get a task's dataset from the Hugging Face hub ({e}); offline, give each task a local "
            f"file in its original format as TASK=PATH (--task-file TASK=PATH; tasks: {', '.join(TASKS)})"
        ) from e
    return _summary(name, out, list(chosen), limit, time.perf_counter() - start)


def _summary(name: str, out: dict, selected: list[str], limit, seconds: float) -> dict:
    import lm_eval

    per_task = {}
    for task in selected:
        result, metric = out["results"][task], TASKS[task]
        entry = {"source": out["configs"][task]["dataset_path"], "examples": out["n-samples"][task]["effective"]}
        for m in ("acc", "acc_norm"):
            if f"{m},none" in result:
                entry[m], entry[f"{m}_stderr"] = result[f"{m},none"], result[f"{m}_stderr,none"]
        per_task[task] = {**entry, "metric": metric, "score": result[f"{metric},none"]}
        if "samples" in out:
            samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            per_task[task]["correct"] = [int(s[metric]) for s in samples]
    return {
        "model": name,
        "tasks": per_task,
        "mean": sum(t["score"] for t in per_task.values()) / len(per_task),
        "mean_over": selected,
        "limit": limit,
        "num_fewshot": 0,
        "lm_eval_version": lm_eval.__version__,
        "seconds": round(seconds, 1),
    }

