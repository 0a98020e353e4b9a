"""`qrecover compare`: qrecover side by side with the baselines users know, on their model and data.

For every bit width, on the same calibration tokens:
    rtn        round-to-nearest (qrecover, no salient columns)
    gptq       GPTQ (qrecover, k = 0)
    gptqmodel  GPTQ through GPTQModel, when installed
    awq        AWQ through GPTQModel, when installed
    salient    qrecover with salient columns, before recovery
    gift       the same after GIFT-SW recovery
    lora       the same after LoRA recovery (about as many trainable parameters)
Each stage runs in its own process (its own peak memory; forked from a server with torch and
transformers imported, see forked.py) and leaves `<out>/runs/<method>-w<bits>/` with its checkpoint,
`result.json` and the stage's output in `stage.log`; a rerun with the same settings reuses finished stages, and one
that changes only what is evaluated (texts, windows, zero-shot tasks, limit) re-evaluates their
saved checkpoints without rebuilding them.
The table goes to comparison.md / .csv / .json, with a perplexity-vs-bits plot and the recovery
loss curves, and the time the stages took with an estimate of what the full preset would take.
Zero-shot scores are kept per example, so each row also gets its paired difference from the best
baseline at its bit width.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import forked
from ..config import check_bits, check_damp
from ..errors import QRecoverError
from ..outputs import claim
from ..resume import digest as settings_digest
from ..utils import atomic_write_json, peak_memory_mb
from .paired import paired_difference

METHODS = ("rtn", "gptq", "gptqmodel", "awq", "scales", "salient", "gift", "lora")
# Recovered stages and the quantized stage each starts from: scales (the README main job's
# recovery: each group's scale trained, k = 0) from gptq, the column methods from salient.
RECOVERED = {"scales": "gptq", "gift": "salient", "lora": "salient"}
PEER_PACKAGE = {"gptqmodel": "gptqmodel", "awq": "gptqmodel"}


@dataclass
class Preset:
    nsamples: int
    seqlen: int
    eval_windows: int | None
    steps: int
    batch_size: int
    max_length: int
    # Chosen by tools/bench_recover.py's pilots on held-out training blocks (SmolLM2-135M, w3): 5e-4
    # beat 1e-4 for GIFT-SW, no-noise and LoRA alike (docs/BENCHMARKS.md).
    lr: float = 5e-4
    lr_lora: float = 5e-4
    # The main job's scale learning rate, chosen by 40-step pilots on held-out blocks (recipes/smollm2-135m-w4.yaml).
    scale_lr: float = 3e-3
    # Recovery and evaluation keep the dequantized weights in memory (faster, same results up to
    # float rounding): fine for the small models the reduced preset is sized for, not for a 7B model on one GPU.
    cache_weights: bool = False


PRESETS = {
    # Sized for three bit widths within an hour on 2 CPU cores (SmolLM2-135M).
    "reduced": Preset(nsamples=16, seqlen=512, eval_windows=4, steps=20, batch_size=2, max_length=512, cache_weights=True),
    # The usual quantization protocol; recovery as in tools/bench_recover.py.
    "full": Preset(nsamples=128, seqlen=2048, eval_windows=None, steps=100, batch_size=4, max_length=512),
}


@dataclass
class Comparison:
    model: str
    out: str
    bits: list = field(default_factory=lambda: [4, 3, 2])
    methods: list = field(default_factory=lambda: list(METHODS))
    preset: str = "reduced"
    group_size: int = 128
    sym: bool = True  # symmetric grids for qrecover and GPTQModel's GPTQ; AWQ's are always asymmetric
    mse_clip: bool = True  # qrecover's MSE-searched clip of each group's range (GPTQModel's default: off)
    damp: float | None = None  # GPTQ dampening for qrecover and GPTQModel; None: each tool's own (0.01, 0.05)
    salient: str = "3%"
    calib: str = "wikitext2"
    train_data: str = "wikitext2"
    objective: str = "kd"  # of both recoveries (gift and lora): distillation from the model, or ce
    eval_datasets: list = field(default_factory=lambda: ["wikitext2"])
    tasks: list = field(default_factory=list)
    limit: int | None = None
    eval_windows: int | None = None  # perplexity windows of 2048 tokens: None the preset's, 0 all of them
    device: str | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise QRecoverError(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise QRecoverError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        for b in self.bits:
            check_bits(b, "bits")
        if self.damp is not None:
            check_damp(self.damp)


def stage_dir(cmp: Comparison, method: str, bits: int) -> Path:
    return Path(cmp.out) / "runs" / f"{method}-w{bits}"


# The recovered stages start from the salient checkpoint, so they use what it was built with.
QRECOVER_QUANTIZED = ("rtn", "gptq", "scales", "salient", "gift", "lora")
# Options that only some methods use, with their defaults. A method that does not use one hashes its
# default, so changing it rebuilds only the stages it changes (not GPTQModel's AWQ, for one).
STAGE_OPTIONS = {
    "salient": ("3%", {"salient", "gift", "lora"}),
    "sym": (True, set(METHODS) - {"awq"}),  # AWQ's grid is always asymmetric
    "mse_clip": (True, set(QRECOVER_QUANTIZED)),
    "damp": (None, set(QRECOVER_QUANTIZED) - {"rtn"} | {"gptqmodel"}),
}
RECOVERY_SETTINGS = ("train_data", "objective", "steps", "batch_size", "max_length", "lr", "lr_lora", "scale_lr")
EVALUATION_SETTINGS = ("eval_datasets", "eval_windows", "tasks", "limit")


def _digest(cmp: Comparison, method: str, bits: int, evaluation: bool = True) -> str:
    """What a stage's result depends on, or without `evaluation` what its checkpoint depends on:
    a quantization stage is kept when only recovery settings change."""
    settings = asdict(cmp) | asdict(PRESETS[cmp.preset]) | {"method": method, "bits": bits}
    settings["eval_windows"] = _eval_windows(cmp)  # what is evaluated, however it was asked for
    ignored = ("out", "methods", "preset", "cache_weights") + (() if method in RECOVERED else RECOVERY_SETTINGS)
    ignored += () if evaluation else EVALUATION_SETTINGS
    for key in ignored:
        settings.pop(key)
    for key, (default, users) in STAGE_OPTIONS.items():
        if method not in users:
            settings[key] = default
    return settings_digest(settings)[:16]


def missing_package(method: str) -> str | None:
    package = PEER_PACKAGE.get(method)
    if package and importlib.util.find_spec(package) is None:
        return f"skipped {method}: the {package} package is not installed (pip install {package})"
    return None


def run_compare(cmp: Comparison, progress: bool = True) -> list[dict]:
    """Run what is missing, then write the table, files and plots; returns the rows."""
    claim(cmp.out, "comparison")  # a new or empty folder, or one an earlier comparison made
    rows = []
    for bits in cmp.bits:
        for method in [m for m in METHODS if m in cmp.methods]:
            skip = missing_package(method)
            if skip:
                print(f"qrecover compare: {skip}", file=sys.stderr)
                continue
            result_path = stage_dir(cmp, method, bits) / "result.json"
            digest, checkpoint_digest = _digest(cmp, method, bits), _digest(cmp, method, bits, evaluation=False)
            saved = _saved_result(result_path)
            if saved.get("digest") == digest:
                rows.append(saved)
                continue
            evaluate_only = _has_checkpoint(cmp, method, bits)
            if method in RECOVERED and not evaluate_only:
                _ensure_base(cmp, RECOVERED[method], bits)
            if progress:
                what = f"re-evaluating the saved {method} checkpoint" if evaluate_only else method
                print(f"qrecover compare: {what} at {bits} bits ...", file=sys.stderr, flush=True)
            spec = {"comparison": asdict(cmp), "method": method, "bits": bits, "digest": digest,
                    "checkpoint_digest": checkpoint_digest, "evaluate_only": evaluate_only}
            start = time.perf_counter()
            log = result_path.with_name("stage.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            code = forked.run("qrecover.bench.compare:run_stage", (spec,), log)
            if code != 0 or not result_path.is_file():
                tail = forked.log_tail(log)
                if method in PEER_PACKAGE:  # a baseline's failure costs its row, not the comparison
                    print(f"qrecover compare: skipped {method} at {bits} bits, {PEER_PACKAGE[method]} failed:\n{tail}", file=sys.stderr)
                    continue
                raise QRecoverError(f"compare stage {method} at {bits} bits failed:\n{tail}")
            # The stage's whole cost, its process start and imports included; a re-evaluation's
            # replaces the time the earlier evaluation took.
            seconds = time.perf_counter() - start + (saved["stage_seconds"] - _evaluation_seconds(saved) if evaluate_only else 0)
            row = json.loads(result_path.read_text()) | {"stage_seconds": round(seconds, 2)}
            atomic_write_json(result_path, row)
            rows.append(row)
    times = write_outputs(cmp, rows)
    if progress:
        print(f"qrecover compare: {time_summary(times)}", file=sys.stderr)
    return rows


def _saved_result(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _has_checkpoint(cmp: Comparison, method: str, bits: int) -> bool:
    """Whether the stage's saved checkpoint was built with these settings."""
    where = stage_dir(cmp, method, bits)
    saved = _saved_result(where / "result.json")
    return saved.get("checkpoint_digest") == _digest(cmp, method, bits, evaluation=False) and (where / "model").is_dir()


def _evaluation_seconds(row: dict) -> float:
    return row.get("perplexity_seconds", 0.0) + row.get("zeroshot", {}).get("seconds", 0.0)


def _without_evaluation(row: dict) -> dict:
    """A stage's result less what _evaluate (and the table's zero-shot column) added to it."""
    return {k: v for k, v in row.items()
            if not (k.startswith("perplexity_") or k.endswith("_perplexity") or k.startswith("zeroshot"))}


def full_preset_seconds(cmp: Comparison, rows: list[dict]) -> float:
    """What these stages would take with the full preset on the same machine, from their measured parts.

    Quantization and recovery time are scaled linearly by calibration and training tokens, perplexity
    by windows; zero-shot evaluation and the rest of a stage (process start, loading, saving) stay as
    measured. The GPTQ solve does not grow with tokens, so quantization is overestimated.
    """
    this, full = PRESETS[cmp.preset], PRESETS["full"]
    calib = full.nsamples * full.seqlen / (this.nsamples * this.seqlen)
    train = full.steps * full.batch_size * full.max_length / (this.steps * this.batch_size * this.max_length)
    total = 0.0
    for row in rows:
        windows = row.get("perplexity_windows") or 1
        full_windows = row.get("perplexity_windows_all") if full.eval_windows is None else full.eval_windows
        parts = {
            "quantize_seconds": calib,
            "recover_seconds": train,
            "perplexity_seconds": (full_windows or windows) / windows,
        }
        measured = {key: row.get(key) or 0.0 for key in parts}
        total += row["stage_seconds"] - sum(measured.values())
        total += sum(measured[key] * ratio for key, ratio in parts.items())
    return total


def run_time(cmp: Comparison, rows: list[dict]) -> dict:
    """Seconds the stages took, and (for a smaller preset) what the full preset would take."""
    times = {"stages": len(rows), "stage_seconds": round(sum(r["stage_seconds"] for r in rows), 1)}
    if cmp.preset != "full":
        times["full_preset_estimate_seconds"] = round(full_preset_seconds(cmp, rows))
    return times


def time_summary(times: dict) -> str:
    line = f"the {times['stages']} stages took {times['stage_seconds'] / 60:.1f} min in all"
    if "full_preset_estimate_seconds" in times:
        line += (f"; the full preset would take about {times['full_preset_estimate_seconds'] / 3600:.1f} h "
                 "on this machine (extrapolated from these stages)")
    return line


def _ensure_base(cmp: Comparison, base: str, bits: int) -> None:
    """A recovery stage starts from a quantized stage's checkpoint: build it first if it is missing or stale."""
    if not _has_checkpoint(cmp, base, bits):
        run_compare(Comparison(**(asdict(cmp) | {"bits": [bits], "methods": [base]})), progress=True)


def run_stage(spec: dict) -> None:
    """One stage, in its own process: quantize or recover (or take the saved checkpoint), evaluate,
    write result.json."""
    cmp = Comparison(**spec["comparison"])
    method, bits = spec["method"], spec["bits"]
    preset = PRESETS[cmp.preset]
    where = stage_dir(cmp, method, bits)
    start = time.perf_counter()
    if spec["evaluate_only"]:
        saved = json.loads((where / "result.json").read_text())
        result = _without_evaluation(saved) | {"digest": spec["digest"]}
        start -= saved["seconds"] - _evaluation_seconds(saved)  # the build's time stays counted
    else:
        result = {"method": method, "bits": bits, "digest": spec["digest"],
                  "checkpoint_digest": spec["checkpoint_digest"], "preset": cmp.preset}
        result.update(_build(cmp, method, bits, preset, where / "model"))
    model, tokenizer = _load_stage(cmp, method, where / "model", preset.cache_weights)
    result.update(_evaluate(cmp, model, tokenizer))
    result["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(where / "result.json", result)


def _build(cmp: Comparison, method: str, bits: int, preset: Preset, checkpoint: Path) -> dict:
    """Quantize or recover into `checkpoint`; returns its times, peak memory and real bits per weight."""
    from .. import api
    from ..config import QuantConfig
    from .footprint import stored_bits
    from ..recovery.config import RecoverConfig, TrainConfig

    result = {}
    if method in ("rtn", "gptq", "salient"):
        config = QuantConfig(
            bits=bits, group_size=cmp.group_size, sym=cmp.sym, method="rtn" if method == "rtn" else "gptq",
            salient=cmp.salient if method == "salient" else 0, mse_clip=cmp.mse_clip,
            **({} if cmp.damp is None else {"damp": cmp.damp}),
        )
        report = api.quantize(cmp.model, checkpoint, config, calib=cmp.calib, nsamples=preset.nsamples,
                               seqlen=preset.seqlen, device=cmp.device, overwrite=True, progress=False)
        result["quantize_seconds"] = report["seconds"]
    elif method in RECOVERED:
        config = RecoverConfig(
            data=cmp.train_data, method="lora" if method == "lora" else "gift", objective=cmp.objective,
            # One cache of the teacher's top-k log-probabilities serves every recovery stage: same teacher, same text.
            teacher_cache=None if cmp.objective == "ce" else str(Path(cmp.out) / "teacher-cache"),
            max_length=preset.max_length,
            cache_weights=preset.cache_weights,
            train=TrainConfig(steps=preset.steps, batch_size=preset.batch_size,
                              lr=preset.lr_lora if method == "lora" else preset.lr,
                              scale_lr=preset.scale_lr if method == "scales" else 0.0, save_every=0),
        )
        out = api.recover(str(stage_dir(cmp, RECOVERED[method], bits) / "model"), checkpoint, config, cmp.device, overwrite=True, progress=False)
        result["recover_seconds"] = out["recovery"]["seconds"]
        result["trainable_params"] = out["recovery"]["trainable_params"]
    else:
        from .peers import peer_quantize

        result["quantize_seconds"], result["group_size"] = peer_quantize(method, cmp, bits, preset, checkpoint)
    result["peak_memory_mb"] = peak_memory_mb(cmp.device)
    if method == "lora":  # the adapter is stored beside the unchanged quantized base
        bits_, weights = stored_bits(stage_dir(cmp, "salient", bits) / "model")
        bits_ += stored_bits(checkpoint, adapter=True)[0]
    else:
        bits_, weights = stored_bits(checkpoint)
    result["bits_per_weight"] = round(bits_ / weights, 4)
    return result


def _load_stage(cmp: Comparison, method: str, checkpoint: Path, cache_weights: bool):
    """(model, tokenizer) of a stage's saved checkpoint; cache_weights: evaluation too computes with
    the dequantized weights (memory for speed)."""
    if method in PEER_PACKAGE:
        from .peers import load_peer

        return load_peer(method, checkpoint)
    from ..api import load

    return load(checkpoint, device=cmp.device or "cpu", cache_weights=cache_weights)


def _eval_windows(cmp: Comparison) -> int | None:
    """The cap on perplexity windows (None: every window)."""
    return PRESETS[cmp.preset].eval_windows if cmp.eval_windows is None else cmp.eval_windows or None


def _evaluate(cmp: Comparison, model, tokenizer) -> dict:
    """Perplexity and fidelity to the full-precision model (mean and 99th-percentile KL, top-1
    agreement, from the same forward passes) on every eval text, the first one's fidelity in the
    table; zero-shot scores per example."""
    from ..api import load, score

    reference = load(cmp.model)[0] if cmp.eval_datasets else None
    scores = score(model, tokenizer, cmp.eval_datasets, reference=reference, max_windows=_eval_windows(cmp),
                   tasks=cmp.tasks, limit=cmp.limit, per_example=True, progress=False)
    del reference
    zeroshot = scores.pop("zeroshot", None)
    texts = list(scores.values())
    results = {k: texts[0][k] for k in ("kl_mean", "kl_p99", "top1_agreement")} if texts else {}
    results |= {f"{label}_perplexity": r["perplexity"] for label, r in scores.items()}
    results |= {"perplexity_seconds": sum(r["seconds"] for r in texts), "perplexity_windows": sum(r["windows"] for r in texts),
                "perplexity_windows_all": sum(r["windows_available"] for r in texts)}
    if zeroshot is not None:
        results["zeroshot"] = zeroshot
    return results


def write_outputs(cmp: Comparison, rows: list[dict]) -> dict:
    """Write the table, files and plots; returns run_time's summary."""
    out = Path(cmp.out)
    out.mkdir(parents=True, exist_ok=True)
    ppl_keys = [f"{Path(d).stem}_perplexity" for d in cmp.eval_datasets]
    columns = ["bits", "method", "bits_per_weight", *ppl_keys, "kl_mean", "top1_agreement", "quantize_seconds", "recover_seconds", "peak_memory_mb"]
    if cmp.tasks:
        columns += ["zeroshot_mean", "zeroshot_vs_peer"]
    for row in rows:
        if "zeroshot" in row:
            row["zeroshot_mean"] = row["zeroshot"].get("mean")
    _pair_with_best_peer(rows)
    with open(out / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    times = run_time(cmp, rows)
    atomic_write_json(out / "comparison.json", {"comparison": asdict(cmp), "preset": asdict(PRESETS[cmp.preset]), "rows": rows, "time": times})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    lines += ["", f"Time: {time_summary(times)}."]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    _plots(cmp, rows, ppl_keys[0] if ppl_keys else None)
    return times


def _pair_with_best_peer(rows: list[dict]) -> None:
    """Give each row the paired difference of its zero-shot mean from the best baseline's at its bit
    width (the peer with the highest mean), scored on the same examples: the error of a paired
    difference counts only the questions the two disagree on, so it tells real gaps from noise."""
    for bits in {r["bits"] for r in rows}:
        peers = [r for r in rows if r["bits"] == bits and r["method"] in PEER_PACKAGE and r.get("zeroshot_mean") is not None]
        if not peers:
            continue
        best = max(peers, key=lambda r: r["zeroshot_mean"])
        for row in rows:
            if row["bits"] == bits and row is not best and row.get("zeroshot_mean") is not None:
                paired = paired_difference(row["zeroshot"], best["zeroshot"])["mean"]
                row["zeroshot_paired"] = paired | {"against": best["method"]}
                row["zeroshot_vs_peer"] = f"{paired['difference']:+.3f} ± {paired['stderr']:.3f} vs {best['method']}"


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _plots(cmp: Comparison, rows: list[dict], key: str | None) -> None:
    out = Path(cmp.out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if key:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for method in METHODS:
            points = sorted((r["bits_per_weight"], r[key]) for r in rows if r["method"] == method and key in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_yscale("log")
        _save_plot(fig, ax, "bits per weight (all stored tensors)", key.replace("_", " "), out / "perplexity_vs_bits.png")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in rows:
        log = stage_dir(cmp, row["method"], row["bits"]) / "model" / "recovery_log.json"
        if log.is_file():
            steps = json.loads(log.read_text())["log"]
            ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label=f"{row['method']} w{row['bits']}")
    if ax.lines:
        _save_plot(fig, ax, "step", "training loss", out / "recovery_loss.png")
    plt.close(fig)


def _save_plot(fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
