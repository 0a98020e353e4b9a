"""Recovery under `accelerate launch` with two CPU processes (gloo): the same result as one process
with the same global batch, and an exact resume after the processes are killed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrecover.io import load_checkpoint

pytestmark = pytest.mark.slow  # two accelerate processes, killed and resumed

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _recover_args(checkpoint, out, grad_accum: int) -> list[str]:
    return ["recover", str(checkpoint), "--out", str(out), "--objective", "ce", "--noise", "gaussian", "--steps", "16",
            "--batch-size", "2", "--grad-accum", str(grad_accum), "--max-length", "64", "--lr", "1e-3", "--save-every", "4", "--quiet"]


def _launch(args: list[str], processes: int, **kw) -> subprocess.Popen:
    # `accelerate launch --cpu --num_processes 2` starts a single process; on CPUs the processes come
    # from the multi-GPU launcher (torchrun) with ACCELERATE_USE_CPU set, and talk through gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "qrecover.cli", *args]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qrecover.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _salient(path) -> dict:
    return {k: v.float() for k, v in load_checkpoint(path)[0].state_dict().items() if k.endswith("salient_weight")}


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume(quantized_tiny, tmp_path):
    before = _salient(quantized_tiny)
    one = _launch(_recover_args(quantized_tiny, tmp_path / "one", grad_accum=2), 1)
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]

    # Two processes, micro-batch 2 each, no accumulation: the same 4 examples a step. Killed at its
    # first saved checkpoint, then rerun: it resumes there.
    args = _recover_args(quantized_tiny, tmp_path / "two", grad_accum=1)
    first = _launch(args, 2)
    state = tmp_path / "two.qrecover-work" / "state.json"
    deadline = time.time() + 600
    while not state.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill every process of this run by its --out.
    subprocess.run(["pkill", "-9", "-f", "--", f"--out {tmp_path / 'two'} "])
    first.wait()
    time.sleep(1)
    assert state.is_file() and not (tmp_path / "two").exists(), (
        f"killed before its first checkpoint or after the end:\n{first.stderr.read()[-3000:]}")
    stopped_at = json.loads(state.read_text())["step"]
    assert 4 <= stopped_at < 16
    second = _launch(args, 2)
    assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]

    assert "training in 2 processes, 4 examples a step" in second.stderr.read()
    log = json.loads((tmp_path / "two" / "recovery_log.json").read_text())["log"]
    assert [r["step"] for r in log] == list(range(1, 17))
    a, b = _salient(tmp_path / "one"), _salient(tmp_path / "two")
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    # gloo's mean of the two processes' gradients may round differently from accumulation's sum
    assert moved > 5e-3 and apart < 1e-5, (moved, apart)

