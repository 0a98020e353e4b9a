"""kill -9 `quantize` and `recover` at random points: never a loadable half checkpoint, and every
rerun ends with the bytes of the uninterrupted run, its report counting the whole run's time.

The commands run in processes forked from a server that has imported torch and transformers
(qrecover.forked): real processes, really killed with SIGKILL, that start in a fraction of a second
instead of the 6-10 s a fresh interpreter spends on its imports."""
import json
import random
import time

import pytest
from conftest import tiny_model

from qrecover import forked

pytestmark = pytest.mark.slow  # killed and rerun processes

KILLS = 5
QUANTIZE = ["--bits", "3", "--group-size", "32", "--salient", "4", "--nsamples", "16", "--seqlen", "128", "--quiet"]
RECOVER = ["--steps", "12", "--batch-size", "2", "--max-length", "64", "--save-every", "1", "--lr", "1e-3", "--quiet"]


def start(args, log):
    return forked.start("qrecover.cli:main", (args,), log)


def run_to_end(args):
    """(seconds from start until the work folder appeared, until it was removed again, stderr): the
    window in which a kill leaves something to resume, the final save included."""
    log = _log(args)
    started = time.perf_counter()
    proc = start(args, log)
    work, appeared, gone = _work_folder(args), None, None
    while proc.is_alive():
        now = time.perf_counter() - started
        if appeared is None and work.exists():
            appeared = now
        elif appeared is not None and gone is None and not work.exists():
            gone = now
        time.sleep(0.01)
    proc.join()
    err = forked.log_tail(log, 100_000)
    assert proc.exitcode == 0, err
    return appeared, gone or time.perf_counter() - started, err


def _log(args):
    out = output_of(args)
    return out.with_name(out.name + ".log")


def _work_folder(args):
    out = output_of(args)
    return out.with_name(out.name + ".qrecover-work")


def kill_at_random(args, rng, span: float) -> bool:
    """Start the command, wait until its work folder appears, kill -9 it a random part of `span`
    later; True if it was killed (not finished already)."""
    proc = start(args, _log(args))
    work = _work_folder(args)
    deadline = time.perf_counter() + 300
    while not work.exists() and proc.is_alive() and time.perf_counter() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, span))
    alive = proc.is_alive()
    proc.kill()  # SIGKILL
    proc.join()
    assert alive or proc.exitcode == 0, forked.log_tail(_log(args))
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


def output_of(args):
    from pathlib import Path

    return Path(args[args.index("--out") + 1])


def kills_and_reruns(args_for, reference_args, seed: int, progress_file: str, resumed_message: str):
    """Run reference_args to the end; then, KILLS times, kill args_for(k) at a random point, check that
    no half checkpoint is left, rerun it to the end and check its bytes. Yields (rerun output,
    reference output) for the caller's own checks; at least two kills must have come mid-run."""
    appeared, gone, _ = run_to_end(reference_args)
    reference = output_of(reference_args)
    rng = random.Random(seed)
    killed_mid_run = 0
    for k in range(KILLS):
        args = args_for(k)
        out = output_of(args)
        killed = kill_at_random(args, rng, gone - appeared)
        assert_no_half_checkpoint(out, reference)
        if out.exists():
            continue  # killed after it finished: nothing to resume
        resumed = (_work_folder(args) / progress_file).is_file()
        killed_mid_run += killed and resumed
        _, _, err = run_to_end(args)
        assert (resumed_message in err) == resumed
        assert weights(out) == weights(reference) and not _work_folder(args).exists()
        yield out, reference
    assert killed_mid_run >= 2, "too few kills landed between two saves to test a resume"


def test_quantize_killed_at_random_points_resumes_to_identical_bytes(deep_model_dir, tmp_path):
    def args(name):
        return ["quantize", str(deep_model_dir), "--out", str(tmp_path / name), *QUANTIZE]

    for out, reference in kills_and_reruns(lambda k: args(f"q{k}"), args("reference"), 1, "progress.json",
                                           "resuming the interrupted quantization"):
        assert (out / "config.json").read_bytes() == (reference / "config.json").read_bytes()
        report = json.loads((out / "quantization_report.json").read_text())
        assert len(report["layers"]) == 8
        assert report["seconds"] >= sum(layer["seconds"] for layer in report["layers"])


def test_recover_killed_at_random_points_resumes_to_identical_bytes(deep_model_dir, tmp_path):
    checkpoint = tmp_path / "q"
    run_to_end(["quantize", str(deep_model_dir), "--out", str(checkpoint), *QUANTIZE])

    def args(name):
        return ["recover", str(checkpoint), "--out", str(tmp_path / name), *RECOVER]

    for out, _ in kills_and_reruns(lambda k: args(f"r{k}"), args("reference"), 2, "state.json",
                                   "resuming the interrupted recovery"):
        log = json.loads((out / "recovery_log.json").read_text())
        assert [r["step"] for r in log["log"]] == list(range(1, 13))
        assert log["recovery"]["seconds"] >= sum(r["seconds"] for r in log["log"])
