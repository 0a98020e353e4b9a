import csv
import dataclasses
import json
import shutil

import pytest
from conftest import PIQA

from qrecover.bench.compare import Comparison, run_compare, stage_dir
from qrecover.errors import QRecoverError
from qrecover.bench.footprint import bits_per_weight


@pytest.mark.slow
def test_compare_runs_every_method_once_and_reuses_stages(tiny_model_dir, tmp_path, capsys):
    cmp = Comparison(
        model=str(tiny_model_dir), out=str(tmp_path / "cmp"), bits=[4],
        methods=["rtn", "gptq", "gptqmodel", "scales", "salient", "gift", "lora"], salient="5%",
    )
    rows = run_compare(cmp, progress=False)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"rtn", "gptq", "gptqmodel", "scales", "salient", "gift", "lora"}
    for r in rows:
        assert r["wikitext2_perplexity"] > 1 and r["peak_memory_mb"] > 0
        assert r["kl_mean"] > 0 and 0 < r["top1_agreement"] <= 1  # fidelity to the unquantized model
    # Real bits per weight: 4-bit codes plus fp16 scales and zeros of 128-column groups and g_idx,
    # plus 16-bit columns for the salient methods, plus the adapter for LoRA.
    assert 4.1 < by_method["gptq"]["bits_per_weight"] < 5.0
    assert by_method["gptq"]["bits_per_weight"] == pytest.approx(by_method["gptqmodel"]["bits_per_weight"], abs=0.01)
    assert by_method["salient"]["bits_per_weight"] > by_method["gptq"]["bits_per_weight"] + 0.5
    assert by_method["gift"]["bits_per_weight"] == by_method["salient"]["bits_per_weight"]
    assert by_method["lora"]["bits_per_weight"] > by_method["salient"]["bits_per_weight"]
    assert by_method["gift"]["recover_seconds"] > 0 and by_method["gift"]["trainable_params"] > 0
    # Trained scales: gptq's checkpoint at its bits, one trained factor per group and output.
    assert by_method["scales"]["bits_per_weight"] == by_method["gptq"]["bits_per_weight"]
    assert by_method["scales"]["trainable_params"] > 0
    assert by_method["scales"]["wikitext2_perplexity"] != by_method["gptq"]["wikitext2_perplexity"]

    out = tmp_path / "cmp"
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 4 + len(rows) and "gptqmodel" in table
    assert "stages took" in table and "the full preset would take about" in table
    times = json.loads((out / "comparison.json").read_text())["time"]
    assert times["stage_seconds"] >= sum(r["seconds"] for r in rows)
    assert times["full_preset_estimate_seconds"] > times["stage_seconds"]
    assert len(list(csv.DictReader(open(out / "comparison.csv")))) == len(rows)
    assert (out / "perplexity_vs_bits.png").stat().st_size > 1000 and (out / "recovery_loss.png").is_file()

    # A rerun reuses every finished stage: nothing is recomputed.
    stamps = {m: (stage_dir(cmp, m, 4) / "result.json").stat().st_mtime for m in by_method}
    run_compare(cmp, progress=False)
    assert stamps == {m: (stage_dir(cmp, m, 4) / "result.json").stat().st_mtime for m in by_method}

    # Asking for zero-shot tasks afterwards re-evaluates the saved checkpoints and rebuilds none of them.
    built = {f: f.stat().st_mtime for m in by_method for f in (stage_dir(cmp, m, 4) / "model").iterdir()}
    tasks = dataclasses.replace(cmp, tasks=[f"piqa={PIQA}"], limit=3)
    rescored = {r["method"]: r for r in run_compare(tasks, progress=False)}
    assert built == {f: f.stat().st_mtime for f in built}
    for m, r in rescored.items():
        assert r["zeroshot"]["tasks"]["piqa"]["examples"] == 3
        assert r["wikitext2_perplexity"] == pytest.approx(by_method[m]["wikitext2_perplexity"], rel=1e-4)
        kept = ("quantize_seconds", "recover_seconds", "bits_per_weight", "peak_memory_mb", "checkpoint_digest")
        assert {k: r.get(k) for k in kept} == {k: by_method[m].get(k) for k in kept}
        assert r["digest"] != by_method[m]["digest"]
    assert "zeroshot_mean" in (out / "comparison.md").read_text()
    # Each row's zero-shot mean is paired with the best baseline's (the only one here: GPTQModel) on the same examples.
    saved = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    peer = saved["gptqmodel"]["zeroshot"]["tasks"]["piqa"]["correct"]
    for m in set(saved) - {"gptqmodel"}:
        mine = saved[m]["zeroshot"]["tasks"]["piqa"]["correct"]
        assert saved[m]["zeroshot_paired"]["against"] == "gptqmodel"
        assert saved[m]["zeroshot_paired"]["difference"] == pytest.approx((sum(mine) - sum(peer)) / 3)
    assert "zeroshot_paired" not in saved["gptqmodel"] and " vs gptqmodel |" in (out / "comparison.md").read_text()

    # A stage whose checkpoint was deleted is rebuilt, not re-evaluated.
    shutil.rmtree(stage_dir(cmp, "rtn", 4) / "model")
    (rtn,) = run_compare(dataclasses.replace(tasks, limit=2, methods=["rtn"]), progress=False)
    assert (stage_dir(cmp, "rtn", 4) / "model").is_dir() and rtn["zeroshot"]["tasks"]["piqa"]["examples"] == 2


def test_missing_peer_is_skipped_with_a_hint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qrecover.bench.compare as compare

    monkeypatch.setattr(compare, "PEER_PACKAGE", {"gptqmodel": "no_such_package_qrecover"})
    rows = run_compare(Comparison(model=str(tiny_model_dir), out=str(tmp_path / "c"), bits=[4], methods=["gptqmodel", "rtn"]), progress=False)
    assert [r["method"] for r in rows] == ["rtn"]
    assert "skipped gptqmodel: the no_such_package_qrecover package is not installed (pip install" in capsys.readouterr().err


@pytest.mark.slow  # a GPTQModel quantization in a stage process (about 30 s)
def test_gptqmodel_runs_when_the_user_asks_for_one_cpu_worker(tiny_model_dir, tmp_path, monkeypatch):
    """GPTQModel 7.7.0's loader refuses a pool of 1 worker; the peer stage raises it to 2."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "1")
    rows = run_compare(Comparison(model=str(tiny_model_dir), out=str(tmp_path / "c"), bits=[4], methods=["gptqmodel"]), progress=False)
    assert [r["method"] for r in rows] == ["gptqmodel"]


@pytest.mark.slow  # two stage processes (about 17 s)
def test_failing_peer_is_skipped_and_the_rest_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "site" / "gptqmodel"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('a broken gptqmodel install')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))  # the stage processes import this one first
    monkeypatch.syspath_prepend(str(broken.parent))
    rows = run_compare(Comparison(model=str(tiny_model_dir), out=str(tmp_path / "c"), bits=[4], methods=["gptqmodel", "rtn"]), progress=False)
    assert [r["method"] for r in rows] == ["rtn"]
    err = capsys.readouterr().err
    assert "skipped gptqmodel at 4 bits, gptqmodel failed" in err and "a broken gptqmodel install" in err


def test_bad_comparison_settings():
    with pytest.raises(QRecoverError, match="preset 'huge'"):
        Comparison(model="m", out="o", preset="huge")
    with pytest.raises(QRecoverError, match="unknown methods"):
        Comparison(model="m", out="o", methods=["qlora"])
    with pytest.raises(QRecoverError, match="bits = 5 is not supported"):
        Comparison(model="m", out="o", bits=[5])
    with pytest.raises(QRecoverError, match=r"damp 0 must be in \(0, 1\]"):
        Comparison(model="m", out="o", damp=0)


def test_bits_per_weight_rejects_unquantized(tiny_model_dir):
    with pytest.raises(QRecoverError, match="no quantized linear"):
        bits_per_weight(tiny_model_dir)


def test_changing_recovery_settings_keeps_the_quantization_stages(monkeypatch):
    import dataclasses

    import qrecover.bench.compare as compare

    cmp = Comparison(model="m", out="o")
    before = {m: compare._digest(cmp, m, 3) for m in compare.METHODS}
    reduced = compare.PRESETS["reduced"]
    monkeypatch.setitem(compare.PRESETS, "reduced", dataclasses.replace(reduced, lr=reduced.lr * 3, steps=reduced.steps + 1))
    after = {m: compare._digest(cmp, m, 3) for m in compare.METHODS}
    assert {m for m in compare.METHODS if before[m] != after[m]} == {"scales", "gift", "lora"}
    monkeypatch.setitem(compare.PRESETS, "reduced", dataclasses.replace(reduced, nsamples=reduced.nsamples * 2))
    assert all(compare._digest(cmp, m, 3) != before[m] for m in compare.METHODS)
    assert compare._digest(cmp, "gptq", 4) != compare._digest(cmp, "gptq", 3)


@pytest.mark.parametrize("option, users", [
    ({"salient": "0.5%"}, {"salient", "gift", "lora"}),  # the baselines are not rebuilt
    ({"sym": False}, {"rtn", "gptq", "gptqmodel", "scales", "salient", "gift", "lora"}),  # AWQ's grid is always asymmetric
    ({"mse_clip": False}, {"rtn", "gptq", "scales", "salient", "gift", "lora"}),  # qrecover's clip search only
    ({"damp": 0.05}, {"gptq", "gptqmodel", "scales", "salient", "gift", "lora"}),  # GPTQ solvers, ours and GPTQModel's
])
def test_grid_and_solver_options_make_new_stages_only_for_the_methods_using_them(option, users):
    import qrecover.bench.compare as compare

    default, other = Comparison(model="m", out="o"), Comparison(model="m", out="o", **option)
    changed = {m for m in compare.METHODS if compare._digest(default, m, 3) != compare._digest(other, m, 3)}
    assert changed == users


def test_evaluation_settings_change_the_result_but_not_the_checkpoint():
    import qrecover.bench.compare as compare

    base = Comparison(model="m", out="o", tasks=["piqa"], limit=5)
    ce = Comparison(**(dataclasses.asdict(base) | {"objective": "ce"}))
    assert {m for m in compare.METHODS if compare._digest(ce, m, 3) != compare._digest(base, m, 3)} == {"scales", "gift", "lora"}
    for change in ({"tasks": ["arc_easy"]}, {"limit": 50}, {"eval_windows": 16}, {"eval_datasets": ["c4"]}):
        other = Comparison(**(dataclasses.asdict(base) | change))
        for m in compare.METHODS:
            assert compare._digest(other, m, 3) != compare._digest(base, m, 3), change
            assert compare._digest(other, m, 3, evaluation=False) == compare._digest(base, m, 3, evaluation=False)
    assert compare._eval_windows(Comparison(model="m", out="o", eval_windows=0)) is None
    assert compare._eval_windows(base) == compare.PRESETS["reduced"].eval_windows


def test_full_preset_time_scales_each_measured_part_by_its_work():
    from qrecover.bench.compare import PRESETS, full_preset_seconds

    reduced, full = PRESETS["reduced"], PRESETS["full"]
    calib = full.nsamples * full.seqlen / (reduced.nsamples * reduced.seqlen)
    train = full.steps * full.batch_size * full.max_length / (reduced.steps * reduced.batch_size * reduced.max_length)
    rows = [
        # 10 s quantizing, 4 of 100 windows in 8 s, 30 s of the rest (zero-shot, loading, process start)
        {"quantize_seconds": 10.0, "perplexity_seconds": 8.0, "perplexity_windows": 4, "perplexity_windows_all": 100,
         "seconds": 40.0, "stage_seconds": 48.0},
        {"recover_seconds": 20.0, "perplexity_seconds": 8.0, "perplexity_windows": 4, "perplexity_windows_all": 100,
         "seconds": 50.0, "stage_seconds": 55.0},
    ]
    expected = (30 + 10 * calib + 8 * 25) + (27 + 20 * train + 8 * 25)
    assert full_preset_seconds(Comparison(model="m", out="o"), rows) == pytest.approx(expected)


@pytest.mark.slow
def test_grid_and_solver_options_reach_qrecover_and_gptqmodel(tiny_model_dir, tmp_path):
    cmp = Comparison(model=str(tiny_model_dir), out=str(tmp_path / "cmp"), bits=[4], methods=["gptq", "gptqmodel"],
                     sym=False, mse_clip=False, damp=0.07)
    run_compare(cmp, progress=False)
    ours, peer = (json.loads((stage_dir(cmp, m, 4) / "model" / "config.json").read_text())["quantization_config"]
                  for m in ("gptq", "gptqmodel"))
    assert ours["sym"] is False and ours["mse_clip"] is False and ours["damp"] == 0.07
    assert peer["sym"] is False and peer["meta"]["damp_percent"] == 0.07
