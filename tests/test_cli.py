import json
import subprocess
import sys

import pytest

from qrecover.cli import main


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for option in ("--bits", "--group-size", "--salient", "--metric", "--calib", "--nsamples", "--seqlen", "--out", "--overwrite"):
        assert option in text


def test_quantize_then_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code = main([
        "quantize", str(tiny_model_dir), "--out", str(out), "--bits", "3", "--group-size", "32",
        "--salient", "5%", "--nsamples", "4", "--seqlen", "64", "--eval", str(text), "--eval-windows", "2", "--quiet",
    ])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["eval_perplexity"] > 1
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["calibration"] == {"samples": 4, "seqlen": 64, "source": "default", "seed": 0}
    assert not (tmp_path / "q.qrecover-work").exists()

    assert main(["eval", str(out), "--dataset", str(text), "--seqlen", "128", "--max-windows", "3", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["perplexity"] > 1
    assert json.loads((out / "eval_eval.json").read_text())["perplexity"] == result["perplexity"]

    # The output exists now: refused without --overwrite, with a clear message and no traceback.
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--nsamples", "2", "--seqlen", "32", "--quiet"]) == 2
    assert "exists; choose another or pass --overwrite" in capsys.readouterr().err


def test_round_to_nearest_reads_no_calibration_text(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import qrecover.api

    def refuse(*args, **kwargs):
        raise AssertionError("calibration text was loaded for round to nearest without salient columns")

    monkeypatch.setattr(qrecover.api, "calibration_samples", refuse)
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["calibration"] is None and report["error"] == "weight"


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "no/such/dir/here"], "does not exist"),
        (["quantize", "./missing-model", "--out", "x"], "does not exist"),
    ],
)
def test_errors_without_traceback(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_bits_rejected_by_the_parser():
    done = subprocess.run([sys.executable, "-m", "qrecover.cli", "quantize", "m", "--out", "o", "--bits", "5"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 5" in done.stderr


def test_salient_more_than_inputs(tiny_model_dir, tmp_path, capsys):
    code = main(["quantize", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--salient", "100", "--nsamples", "2", "--seqlen", "32", "--quiet"])
    assert code == 2
    assert "has 80 input features but 100 salient columns" in capsys.readouterr().err


def test_compare_options_reach_the_comparison(tmp_path, monkeypatch, capsys):
    import qrecover.bench.compare as compare

    seen = []

    def fake_run(cmp):
        seen.append(cmp)
        (tmp_path / "comparison.md").write_text("| table |")

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert main(["compare", "m", "--out", str(tmp_path), "--bits", "4", "--asym", "--no-mse-clip", "--damp", "0.05",
                 "--salient", "0.5%"]) == 0
    cmp = seen[0]
    assert (cmp.bits, cmp.sym, cmp.mse_clip, cmp.damp, cmp.salient) == ([4], False, False, 0.05, "0.5%")
    assert main(["compare", "m", "--out", str(tmp_path)]) == 0
    assert (seen[1].mse_clip, seen[1].damp) == (True, None)  # each tool's own defaults
    assert "| table |" in capsys.readouterr().out


def test_eval_against_reports_fidelity(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["quantize", str(tiny_model_dir), "--out", str(out), "--bits", "2", "--group-size", "32",
                 "--nsamples", "4", "--seqlen", "64", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--against", str(tiny_model_dir), "--dataset", str(text), "--seqlen", "128", "--max-windows", "2", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 2 and result["tokens"] == 2 * 127
    assert 0 < result["kl_mean"] <= result["kl_p99"] and 0 < result["top1_agreement"] < 1
    assert json.loads((out / "fidelity_eval.json").read_text())["kl_mean"] == result["kl_mean"]
    # Against itself: no divergence, full agreement, the same perplexity.
    assert main(["eval", str(tiny_model_dir), "--against", str(tiny_model_dir), "--dataset", str(text), "--seqlen", "128",
                 "--max-windows", "1", "--report", str(tmp_path / "self.json"), "--quiet"]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(same["kl_mean"]) < 1e-6 and same["top1_agreement"] == 1 and abs(same["perplexity"] - same["reference_perplexity"]) < 1e-6
