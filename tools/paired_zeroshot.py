"""Is one checkpoint really better than another on the same zero-shot questions? A paired comparison.

Two checkpoints scored on the same examples mostly agree: both get the easy questions and both miss
the hard ones. Their scores' independent standard errors (about 0.010 each on ARC-Easy's 2,376
questions) overstate how uncertain their difference is; the paired error counts only the questions
on which they disagree. Each report must come from `qrecover eval ... --per-example`:

    .venv/bin/qrecover eval CKPT_A --cache-weights --per-example \
        --task-file arc_easy=tests/data/arc-easy-test-100.jsonl --report a.json
    (the same for CKPT_B into b.json)
    .venv/bin/python tools/paired_zeroshot.py a.json b.json [c.json ...] --json runs/paired.json

Every report after the first is compared with the first. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def z_score(entry: dict) -> float:
    """Difference in paired standard errors (nan when the two never disagree)."""
    return entry["difference"] / entry["stderr"] if entry["stderr"] else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="zero-shot report (--per-example) the others are compared with")
    parser.add_argument("others", nargs="+", help="zero-shot reports (--per-example) of the other checkpoints")
    parser.add_argument("--json", default="runs/paired_zeroshot.json", help="where to write the results")
    args = parser.parse_args()

    from qrecover.bench.paired import paired_difference

    base = json.loads(Path(args.base).read_text())
    rows = []
    print(f"base: {args.base} ({base['model']})\n")
    print("| report | task | metric | examples | score | minus base | paired stderr | z | only this / only base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.others:
        other = json.loads(Path(path).read_text())
        result = paired_difference(other, base)
        for task, t in result["tasks"].items():
            print(f"| {path} | {task} | {t['metric']} | {t['examples']} | {other['tasks'][task]['score']:.4f} | "
                  f"{t['difference']:+.4f} | {t['stderr']:.4f} | {z_score(t):+.2f} | {t['only_a']} / {t['only_b']} |")
        if len(result["tasks"]) > 1:
            m = result["mean"]
            print(f"| {path} | mean | | | | {m['difference']:+.4f} | {m['stderr']:.4f} | {z_score(m):+.2f} | |")
        rows.append({"report": path, "model": other["model"], **result})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": args.base, "base_model": base["model"], "comparisons": rows}, indent=2))


if __name__ == "__main__":
    main()
