#!/usr/bin/env bash
# Create .venv and install qrecover with everything its tests use, on a fresh machine.
# torch is installed first and pinned to the CPU wheel 2.13.0 (torch 2.14.1 and later, which
# GPTQModel asks for, would pull a multi-GB CUDA build); every later step keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# triton (the [triton] extra, about 290 MB) has no dependencies, so it cannot pull a newer torch.
python -m pip install -q -e ".[test,zeroshot,triton]"
# The GPTQ peer for the interop test and the benchmarks, without its torch>=2.14.1 requirement.
python -m pip install -q --no-deps "gptqmodel==7.7.0"
# optimum: peft refuses LoRA on any layer when gptqmodel is installed without it.
python -m pip install -q "optimum>=1.24,<3" "threadpoolctl>=3.5" "device-smi>=0.5" "pypcre>=0.2" "tokenicer>=0.0.5" "logbar>=0.0.4" "defuser>=0.0.20" "dill>=0.3" "protobuf>=4" "pillow>=10"
python -c "import torch, triton, qrecover, gptqmodel, lm_eval; print('torch', torch.__version__, '| triton', triton.__version__, '| qrecover', qrecover.__version__)"
