"""kill -9 `quantize` and `recover` at random points: never a loadable half checkpoint, and every
rerun ends with the bytes of the uninterrupted run, its report counting the whole run's time."""
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_model

KILLS = 5
QUANTIZE = ["--bits", "3", "--group-size", "32", "--salient", "4", "--nsamples", "16", "--seqlen", "128", "--quiet"]
RECOVER = ["--steps", "12", "--batch-size", "2", "--max-length", "64", "--save-every", "1", "--lr", "1e-3", "--quiet"]


def command(args):
    return [sys.executable, "-m", "qrecover.cli", *args]


def run_to_end(args):
    """(seconds from start until the work folder first appeared, seconds until the end)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work, appeared = _work_folder(args), None
    while proc.poll() is None:
        if appeared is None and work.exists():
            appeared = time.perf_counter() - started
        time.sleep(0.01)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return appeared, time.perf_counter() - started, err


def _work_folder(args):
    from pathlib import Path

    out = Path(args[args.index("--out") + 1])
    return out.with_name(out.name + ".qrecover-work")


def kill_at_random(args, rng, span: float) -> bool:
    """Start the command, wait until its work folder appears, kill -9 it a random part of `span`
    later; True if it was killed (not finished already)."""
    proc = subprocess.Popen(command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    work = _work_folder(args)
    deadline = time.perf_counter() + 300
    while not work.exists() and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, span))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert alive or proc.returncode == 0, err
    return alive


def weights(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.safetensors"))}


def assert_no_half_checkpoint(out, reference):
    """--out is absent, or it is the whole result (the kill came after the final rename)."""
    if out.exists():
        assert weights(out) == weights(reference)


@pytest.fixture
def deep_model_dir(tmp_path, tiny_tokenizer):
    """The tiny model with 8 layers: enough work between its checkpoints to kill it in the middle."""
    path = tmp_path / "deep"
    tiny_model(vocab=len(tiny_tokenizer), layers=8).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_quantize_killed_at_random_points_resumes_to_identical_bytes(deep_model_dir, tmp_path):
    reference = tmp_path / "reference"
    appeared, total, _ = run_to_end(["quantize", str(deep_model_dir), "--out", str(reference), *QUANTIZE])
    rng = random.Random(1)
    killed_mid_run = 0
    for k in range(KILLS):
        out = tmp_path / f"q{k}"
        args = ["quantize", str(deep_model_dir), "--out", str(out), *QUANTIZE]
        killed = kill_at_random(args, rng, total - appeared)
        assert_no_half_checkpoint(out, reference)
        if out.exists():
            continue  # killed after it finished: nothing to resume
        resumed = _work_folder(args).exists()
        killed_mid_run += killed and resumed
        _, _, err = run_to_end(args)
        assert ("resuming the interrupted quantization" in err) == resumed
        assert weights(out) == weights(reference)
        assert (out / "config.json").read_bytes() == (reference / "config.json").read_bytes()
        report = json.loads((out / "quantization_report.json").read_text())
        assert report["seconds"] >= sum(layer["seconds"] for layer in report["layers"])
        assert len(report["layers"]) == 8 and not _work_folder(args).exists()
    assert killed_mid_run >= 2, "too few kills landed between two saved layers to test a resume"


def test_recover_killed_at_random_points_resumes_to_identical_bytes(deep_model_dir, tmp_path):
    checkpoint = tmp_path / "q"
    run_to_end(["quantize", str(deep_model_dir), "--out", str(checkpoint), *QUANTIZE])
    reference = tmp_path / "reference"
    appeared, total, _ = run_to_end(["recover", str(checkpoint), "--out", str(reference), *RECOVER])
    rng = random.Random(2)
    killed_mid_run = 0
    for k in range(KILLS):
        out = tmp_path / f"r{k}"
        args = ["recover", str(checkpoint), "--out", str(out), *RECOVER]
        killed = kill_at_random(args, rng, total - appeared)
        assert_no_half_checkpoint(out, reference)
        if out.exists():
            continue
        resumed = (_work_folder(args) / "state.json").is_file()
        killed_mid_run += killed and resumed
        _, _, err = run_to_end(args)
        assert ("resuming the interrupted recovery" in err) == resumed
        assert weights(out) == weights(reference)
        log = json.loads((out / "recovery_log.json").read_text())
        assert [r["step"] for r in log["log"]] == list(range(1, 13))
        assert log["recovery"]["seconds"] >= sum(r["seconds"] for r in log["log"])
    assert killed_mid_run >= 2, "too few kills landed between two saved steps to test a resume"
