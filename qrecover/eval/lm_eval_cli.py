"""`qrecover-lm-eval`: lm-eval's own command line, in a process that has imported qrecover.

lm-eval has no plugin hook that would import qrecover for its `--model hf` backend, and transformers
only knows the "qrecover" quantization method once qrecover is imported. This entry point imports
it and hands the arguments, unchanged, to lm-eval, so that

    qrecover-lm-eval --model hf --model_args pretrained=CHECKPOINT --tasks arc_easy,piqa

scores a checkpoint format v1 directory like any Hugging Face model (`python -m
qrecover.eval.lm_eval_cli ...` does the same).
"""
from __future__ import annotations

import sys

import qrecover  # noqa: F401  (registers the transformers quantizer before lm-eval loads a model)


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        print(f"qrecover-lm-eval: lm-eval is not installed ({e}): pip install 'qrecover[zeroshot]'", file=sys.stderr)
        return 2
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
