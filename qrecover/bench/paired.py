"""Is one model better than another on the same zero-shot questions? The paired difference of two
per-example reports (eval.zeroshot with per_example), which tools/paired_zeroshot.py prints and
compare reports beside each row."""
from __future__ import annotations

from ..errors import QRecoverError


def paired_difference(a: dict, b: dict) -> dict:
    """Score of zero-shot report `a` minus that of `b`, per task and on the mean, with paired errors.

    Both reports must come from per_example runs on the same examples. Pairing removes what the two
    models share (the questions' difficulty): the error of the difference is sqrt(var(a_i - b_i) / n),
    much smaller than that of two independent samples when the models mostly agree.
    """
    shared = [t for t in a["tasks"] if t in b["tasks"]]
    if not shared:
        raise QRecoverError("the two zero-shot reports share no task")
    tasks = {}
    for task in shared:
        x, y = a["tasks"][task], b["tasks"][task]
        if "correct" not in x or "correct" not in y:
            raise QRecoverError(f"{task}: a paired difference needs per-example results; rerun the evaluation with --per-example")
        if (x["source"], x["metric"], len(x["correct"])) != (y["source"], y["metric"], len(y["correct"])):
            raise QRecoverError(
                f"{task}: the reports scored different examples or metrics ({x['source']}, {len(x['correct'])} examples, "
                f"{x['metric']} against {y['source']}, {len(y['correct'])} examples, {y['metric']})"
            )
        d = [p - q for p, q in zip(x["correct"], y["correct"])]
        n, mean = len(d), sum(d) / len(d)
        var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
        tasks[task] = {
            "examples": n, "metric": x["metric"], "difference": mean, "stderr": (var / n) ** 0.5,
            "only_a": d.count(1), "only_b": d.count(-1),  # examples one model scores and the other misses
        }
    # The mean over tasks is an average of independent task means: its error adds in quadrature.
    mean = sum(t["difference"] for t in tasks.values()) / len(tasks)
    stderr = sum(t["stderr"] ** 2 for t in tasks.values()) ** 0.5 / len(tasks)
    return {"tasks": tasks, "mean": {"difference": mean, "stderr": stderr}, "over": shared}
