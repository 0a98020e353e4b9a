import json
from pathlib import Path

import pytest
import yaml

from qrecover.errors import QRecoverError
from qrecover.recipes import load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*-w*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.quantize.bits in (2, 3, 4) and recipe.recover is not None
    if "llama" in path.name:  # the paper's settings
        assert recipe.quantize.salient == 128 and recipe.quantize.group_size == -1
        assert (recipe.calibration.nsamples, recipe.calibration.seqlen) == (128, 2048)
        train = recipe.recover.train
        assert (train.steps, train.batch_size * train.grad_accum, train.warmup) == (500, 128, 0.03)
        assert train.lr == (1e-4 if "llama-2" in path.name else 1e-5) and recipe.recover.data == "tulu-v2-mix"


def write_recipe(tmp_path, model_dir, **changes):
    text = tmp_path / "eval.txt"
    text.write_text("Recipes chain quantization, recovery and evaluation. " * 300)
    recipe = {
        "model": str(model_dir), "out": str(tmp_path / "run"),
        "quantize": {"bits": 3, "group_size": 32, "salient": 4},
        "calibration": {"source": "default", "nsamples": 4, "seqlen": 64},
        "recover": {"data": "default", "max_length": 64, "train": {"steps": 2, "batch_size": 2, "lr": 1e-3}},
        "evaluate": {"perplexity": [str(text)], "seqlen": 128, "max_windows": 2},
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_runs_every_stage_and_resumes(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_model_dir)
    summary = run_recipe(load_recipe(path), progress=False)
    out = tmp_path / "run"
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["recovery"]["train"]["steps"] == 2
    assert set(summary["evaluate"]) == {"quantized", "recovered"}
    assert all(v["eval"] > 1 for v in summary["evaluate"].values())
    assert json.loads((out / "summary.json").read_text())["model"] == str(out / "model")
    # Where the time went: every stage's wall seconds, loading included, and their sum.
    times = summary["time"]
    assert set(times["stages"]) == {"quantize", "recover", "evaluate", "export"}
    assert all(times["stages"][stage] > 0 for stage in ("quantize", "recover", "evaluate")) and times["stages"]["export"] >= 0
    assert times["stages"]["recover"] >= summary["recover"]["seconds"]
    assert times["total"] == pytest.approx(sum(times["stages"].values()), abs=0.1)

    # A rerun finds every stage done and changes nothing, its times included.
    stamps = {p: p.stat().st_mtime for p in (out / "stages").glob("*.json")}
    assert run_recipe(load_recipe(path), progress=False)["time"] == times
    assert stamps == {p: p.stat().st_mtime for p in (out / "stages").glob("*.json")}

    changed = write_recipe(tmp_path, tiny_model_dir, quantize={"bits": 4, "group_size": 32, "salient": 4})
    with pytest.raises(QRecoverError, match=r"stage 'quantize' of an earlier recipe made with other settings \(quantize: saved"):
        run_recipe(load_recipe(changed), progress=False)


def test_bad_recipes(tmp_path):
    with pytest.raises(QRecoverError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nout: o\nquantise: {bits: 3}\n")
    with pytest.raises(QRecoverError, match=r"unknown sections \['quantise'\]"):
        load_recipe(bad)
    bad.write_text("model: m\nout: o\nquantize: {bits: 3, colour: red}\n")
    with pytest.raises(QRecoverError, match=r"quantize has unknown settings \['colour'\]"):
        load_recipe(bad)
    bad.write_text("model: m\nout: o\nquantize: {bits: 5}\n")
    with pytest.raises(QRecoverError, match="bits = 5"):
        load_recipe(bad)
    bad.write_text("model: m\nout: o\nevaluate: {precision: fp16}\n")
    with pytest.raises(QRecoverError, match="evaluate.precision 'fp16' is not one of auto, fp32, bf16"):
        load_recipe(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(QRecoverError, match="not valid YAML"):
        load_recipe(bad)
