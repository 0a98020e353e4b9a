"""Recipes: a YAML file describing a whole quantize -> recover -> evaluate -> export chain.

The sections map 1:1 onto the dataclasses: `quantize` onto QuantConfig, `recover` onto
RecoverConfig (its `train` onto TrainConfig). Stages run in order and are resumable: each finished
stage leaves its output under `<out>/stages/` with a marker holding the settings it ran with, so a
rerun skips it, and a changed recipe is refused rather than mixed with old results. Stages that
are interrupted resume from their own work directories (quantization layer by layer, training
from its last checkpoint).

    model: smollm2-135m
    out: runs/smollm2-135m-w3
    quantize: {bits: 3, group_size: 128, salient: 3%, metric: gift}
    calibration: {source: default, nsamples: 32, seqlen: 512}
    recover: {data: default, max_length: 512, train: {steps: 100, batch_size: 4, lr: 1.0e-4}}
    evaluate: {perplexity: [wikitext2], max_windows: 16}
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .config import QuantConfig, check_choice
from .models import LOADING
from .errors import QRecoverError
from .recovery.config import PRECISIONS, RecoverConfig, TrainConfig
from .outputs import atomic_dir, claim
from .resume import StateFile
from .utils import atomic_write_json, parse_size


@dataclass
class Calibration:
    source: str = "default"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    # Bytes (or "4GB") of calibration activations kept in memory, the rest on disk; None: a quarter of memory.
    activation_memory: int | str | None = None

    def __post_init__(self):
        if self.activation_memory is not None:
            self.activation_memory = parse_size(self.activation_memory)


@dataclass
class Evaluation:
    perplexity: list = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: list = field(default_factory=list)  # zero-shot task names, or NAME=PATH for local files
    limit: int | None = None
    # Of the perplexity forwards (api.score): auto is bfloat16 autocast where the hardware multiplies it.
    precision: str = "auto"

    def __post_init__(self):
        # Checked when the recipe is read, not after quantization and recovery have run.
        check_choice(self.precision, PRECISIONS, "evaluate.precision")


@dataclass
class Recipe:
    model: str
    out: str
    quantize: QuantConfig
    calibration: Calibration = field(default_factory=Calibration)
    recover: RecoverConfig | None = None
    evaluate: Evaluation = field(default_factory=Evaluation)
    device: str | None = None
    loading: str = "auto"  # models.LOADING: stream sharded safetensors one layer at a time, or load whole

    def __post_init__(self):
        check_choice(self.loading, LOADING, "loading")

    def stage_settings(self, stage: str) -> dict:
        """What a stage depends on: a change in it invalidates that stage and the ones after."""
        # Where activations live and how the model is read change no result: not part of it.
        calibration = {k: v for k, v in asdict(self.calibration).items() if k != "activation_memory"}
        settings = {"model": self.model, "quantize": self.quantize.to_dict(), "calibration": calibration}
        if stage in ("recover", "evaluate", "export") and self.recover is not None:
            settings["recover"] = self.recover.to_dict()
        if stage == "evaluate":
            settings["evaluate"] = asdict(self.evaluate)
        return settings


def _check_known(values: dict, cls, where: str, what: str = "settings") -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise QRecoverError(f"{where} has unknown {what} {sorted(unknown)}; known: {sorted(known)}")


def _section(cls, values, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise QRecoverError(f"{where} must be a mapping of settings")
    _check_known(values, cls, where)
    return cls(**values)


def load_recipe(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QRecoverError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QRecoverError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or "model" not in raw or "out" not in raw:
        raise QRecoverError(f"recipe {path} needs at least `model` and `out`")
    _check_known(raw, Recipe, f"recipe {path}", "sections")
    recover = raw.get("recover")
    if recover is not None:
        recover = dict(recover)
        recover["train"] = _section(TrainConfig, recover.get("train"), f"{path}: recover.train")
        recover = _section(RecoverConfig, recover, f"{path}: recover")
    return Recipe(
        model=str(raw["model"]), out=str(raw["out"]),
        quantize=_section(QuantConfig, raw.get("quantize"), f"{path}: quantize"),
        calibration=_section(Calibration, raw.get("calibration"), f"{path}: calibration"),
        recover=recover,
        evaluate=_section(Evaluation, raw.get("evaluate"), f"{path}: evaluate"),
        device=raw.get("device"),
        loading=raw.get("loading", "auto"),
    )


class Stages:
    """Markers of finished stages under <out>/stages, each with the settings it ran with."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.root = Path(recipe.out) / "stages"

    def _marker(self, stage: str) -> StateFile:
        return StateFile(self.root / f"{stage}.json", self.recipe.stage_settings(stage), f"stage {stage!r} of an earlier recipe")

    def done(self, stage: str) -> bool:
        return self._marker(stage).read() is not None

    def finish(self, stage: str, result: dict, started: float) -> None:
        """Record `stage` done with its result and its wall time since `started` (perf_counter)."""
        self._marker(stage).write({"result": result, "wall_seconds": round(time.perf_counter() - started, 2)})

    def result(self, stage: str) -> dict:
        return self._marker(stage).read()["result"]

    def seconds(self, stage: str) -> float | None:
        """The wall time of the run that finished `stage`, loading included (None: not recorded)."""
        return self._marker(stage).read().get("wall_seconds")


STAGES = ("quantize", "recover", "evaluate", "export")


def run_recipe(recipe: Recipe, progress: bool = True, until: str = "export") -> dict:
    """Run the chain up to and including stage `until`; returns the summary also written to
    <out>/summary.json. Under `accelerate launch` (several processes) only the recover stage runs,
    in every process: quantize first in one process (until="quantize"), evaluate afterwards."""
    from . import api
    from .recovery.trainer import process_state

    check_choice(until, STAGES, "stage")
    claim(recipe.out, "recipe")  # a new or empty folder, or one an earlier run of a recipe made
    stages = Stages(recipe)
    quantized = stages.root / "quantized"
    process = process_state()
    if process.num_processes > 1 and not stages.done("quantize"):
        raise QRecoverError(
            "under accelerate launch only recovery runs; quantize first in one process: "
            "qrecover run RECIPE --until quantize"
        )
    if not stages.done("quantize"):
        c = recipe.calibration
        start = time.perf_counter()
        report = api.quantize(
            recipe.model, quantized, recipe.quantize, calib=c.source, nsamples=c.nsamples, seqlen=c.seqlen,
            seed=c.seed, device=recipe.device, batch_size=c.batch_size, overwrite=True, progress=progress,
            loading=recipe.loading, activation_memory=c.activation_memory,
        )
        stages.finish("quantize", {"path": str(quantized), "seconds": report["seconds"], "peak_memory_mb": report["peak_memory_mb"]}, start)
    final = quantized
    if until == "quantize":
        return {"model": str(final)}
    if recipe.recover is not None:
        final = stages.root / "recovered"
        if not stages.done("recover"):
            start = time.perf_counter()
            result = api.recover(str(quantized), final, recipe.recover, recipe.device, overwrite=True, progress=progress)
            if not process.is_main_process:
                return {}
            stages.finish("recover", {"path": str(final), "seconds": result["recovery"]["seconds"], "final_loss": result["final_loss"]}, start)
    if until == "recover" or process.num_processes > 1:
        return {"model": str(final)}
    if not stages.done("evaluate"):
        start = time.perf_counter()
        stages.finish("evaluate", {"quantized": _evaluate(quantized, recipe, progress),
                                   **({"recovered": _evaluate(final, recipe, progress)} if final != quantized else {})}, start)
    export = Path(recipe.out) / "model"
    if until != "export":
        return {"model": str(final), "evaluate": stages.result("evaluate")}
    if not stages.done("export"):
        start = time.perf_counter()
        atomic_dir(export, lambda tmp: shutil.copytree(final, tmp, dirs_exist_ok=True), overwrite=True)
        stages.finish("export", {"path": str(export)}, start)
    done = [stage for stage in STAGES if (stages.root / f"{stage}.json").is_file()]
    summary = {
        "recipe": asdict(recipe),
        "model": str(export),
        **{stage: stages.result(stage) for stage in done if stage != "export"},
        "time": stage_times({stage: stages.seconds(stage) for stage in done}),
    }
    atomic_write_json(Path(recipe.out) / "summary.json", summary)
    if progress:
        print(time_table(summary["time"]), file=sys.stderr)
    return summary


def stage_times(seconds: dict) -> dict:
    """Wall seconds of each stage (as the run that finished it measured them, loading included) and
    their total."""
    return {"stages": seconds, "total": round(sum(s or 0 for s in seconds.values()), 1)}


def time_table(times: dict) -> str:
    rows = [f"| {stage} | {'-' if s is None else f'{s:.1f}'} |" for stage, s in times["stages"].items()]
    return "\n".join(["| stage | seconds |", "|---|---:|", *rows, f"| total | {times['total']:.1f} |"])


def _evaluate(path: Path, recipe: Recipe, progress: bool) -> dict:
    from .api import load, score

    ev = recipe.evaluate
    model, tokenizer = load(str(path), device=recipe.device or "cpu")
    scores = score(model, tokenizer, ev.perplexity, seqlen=ev.seqlen, max_windows=ev.max_windows, tasks=ev.tasks,
                   limit=ev.limit, progress=progress, precision=ev.precision)
    return {label: result if label == "zeroshot" else result["perplexity"] for label, result in scores.items()}
