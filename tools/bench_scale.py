"""Scale benchmark: quantizing a large model in bounded memory (issue 35), qrecover streamed against
GPTQModel on the same files, each as its users run it, in its own process, one after the other.

Each configuration's wall time (the whole command: loading, calibration, quantization, saving) and
peak resident memory (the child's own, from wait4) are measured; for qrecover the seconds of every
decoder layer come from its report. A 70B extrapolation scales the measured seconds per layer by
each layer's arithmetic (GPTQ's column walk ~ out x in^2, the Hessian and forwards ~ tokens x in x
(in + out)), and the memory by the largest layer's parts: it is an extrapolation, labelled so.

    python tools/make_synthetic.py /work/synthetic/llama-7b --shape 7b
    python tools/bench_scale.py /work/synthetic/llama-7b --configs qrecover
    python tools/bench_scale.py /work/synthetic/llama-1b --configs qrecover qrecover-k0 gptqmodel

Prints a Markdown table and writes JSON (default runs/bench_scale.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("qrecover", "qrecover-k0", "gptqmodel")
# The shapes the extrapolation reads (config.json names), and LLaMA-2-70B's.
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=32000)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor()
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(have)})"


def linears(cfg: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's seven projections."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def layer_cost(cfg: dict, tokens: int) -> float:
    return sum(o * n * n + tokens * n * (n + o) for n, o in linears(cfg))


def layer_memory_bytes(cfg: dict, tokens: int) -> dict:
    """What one layer's quantization holds at its peak, float32: the layer's weights, three Hessians of
    its widest input (the accumulated one, its permuted copy and a Cholesky factor) and about ten
    activation sets of the widest width."""
    widest = max(n for n, _ in linears(cfg))
    return {"weights": 4 * sum(n * o for n, o in linears(cfg)), "hessians": 3 * 4 * widest**2,
            "activations": 10 * 4 * tokens * widest}


def command(name: str, args, out: Path) -> list[str]:
    if name.startswith("qrecover"):
        salient = "0" if name == "qrecover-k0" else str(args.salient)
        return [sys.executable, "-m", "qrecover.cli", "quantize", str(args.model), "--out", str(out), "--bits", "4",
                "--group-size", "128", "--salient", salient, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                "--calib", "default", "--dtype", args.dtype, "--loading", "stream", "--quiet", "--overwrite"]
    return [sys.executable, __file__, str(args.model), "--peer-run", str(out), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--dtype", args.dtype]


def peer_run(args) -> None:
    """GPTQModel 7.7, w4 g128 symmetric, no act order, on the same calibration tokens as qrecover."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from qrecover.data import calibration_samples

    torch.set_num_threads(os.cpu_count() or 2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    samples = calibration_samples(tokenizer, "default", args.nsamples, args.seqlen, seed=0)
    calibration = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
    peer = GPTQModel.load(str(args.model), QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=False),
                          device="cpu", dtype=getattr(torch, args.dtype))
    peer.quantize(calibration, batch_size=1)
    peer.save(args.peer_run)


def stop_after(proc, progress: Path, layers: int) -> None:
    """Kill the run once its work folder records `layers` finished layers (an interrupted run resumes
    from there: the same crash path the kill -9 tests take)."""
    while proc.poll() is None:
        try:
            if json.loads(progress.read_text())["done"] >= layers:
                proc.kill()
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)


def run(name: str, args, work: Path) -> dict:
    out = work / name
    progress = out.with_name(out.name + ".qrecover-work") / "progress.json"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(progress.parent, ignore_errors=True)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2")}
    start = time.perf_counter()
    proc = subprocess.Popen(command(name, args, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # wait4 gives this child's own rusage (communicate() would reap it first); threads drain its pipes.
    stdout, stderr = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read())) for s, b in ((proc.stdout, stdout), (proc.stderr, stderr))]
    if args.layers and name.startswith("qrecover"):
        readers.append(threading.Thread(target=stop_after, args=(proc, progress, args.layers)))
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for r in readers:
        r.join()
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    stopped = args.layers and name.startswith("qrecover") and code == -9
    if code != 0 and not stopped:
        raise SystemExit(f"{name} failed ({code}):\n{''.join(stderr)[-4000:]}")
    result = {"name": name, "seconds": round(seconds, 1), "peak_memory_mb": round(usage.ru_maxrss / 1024, 1)}
    report = out / "quantization_report.json"
    if stopped:
        result["stopped_after_layers"] = args.layers
        layers = json.loads(progress.read_text())["layers"]
        per_layer = [layer["seconds"] for layer in layers]
        result.update(layers=len(per_layer), layer_seconds_mean=round(sum(per_layer) / len(per_layer), 2),
                      layer_seconds_max=max(per_layer), layer_seconds=per_layer)
    elif report.is_file():
        layers = json.loads(report.read_text())["layers"]
        per_layer = [layer["seconds"] for layer in layers]
        result.update(layers=len(per_layer), layer_seconds_mean=round(sum(per_layer) / len(per_layer), 2),
                      layer_seconds_max=max(per_layer), quantize_seconds=json.loads(report.read_text())["seconds"])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a model directory of sharded safetensors (tools/make_synthetic.py)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=["qrecover"])
    p.add_argument("--salient", type=int, default=128, help="salient columns per layer for 'qrecover' (default 128)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="compute dtype of both tools (default float32)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_scale")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_scale.json")
    p.add_argument("--layers", type=int, help="stop qrecover's runs after this many decoder layers (peak memory and "
                   "seconds per layer measured on them; the whole run's time extrapolated, and labelled so)")
    p.add_argument("--peer-run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_run:
        peer_run(args)
        return 0

    cfg = json.loads((args.model / "config.json").read_text())
    model_bytes = json.loads((args.model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    results = [run(name, args, args.work) for name in args.configs]
    tokens = args.nsamples * args.seqlen
    ours = next((r for r in results if r["name"] == "qrecover"), None)
    summary = {"model_mb": round(model_bytes / 2**20), "layers": cfg["num_hidden_layers"], "tokens": tokens}
    if ours and "stopped_after_layers" in ours:
        # Not measured: the layers after the stop, at the measured mean (every layer has the same shape).
        ours["whole_run_seconds_extrapolated"] = round(ours["seconds"] + ours["layer_seconds_mean"] * (cfg["num_hidden_layers"] - ours["layers"]))
    if ours and "layer_seconds_mean" in ours:
        ratio = layer_cost(LLAMA2_70B, tokens) / layer_cost(cfg, tokens)
        per_layer_70b = ours["layer_seconds_mean"] * ratio
        mem = layer_memory_bytes(LLAMA2_70B, tokens)
        summary["extrapolated_70b"] = {
            "seconds_per_layer": round(per_layer_70b), "hours": round(per_layer_70b * 80 / 3600, 1),
            "layer_peak_gb": round(sum(mem.values()) / 2**30, 1), "parts_gb": {k: round(v / 2**30, 1) for k, v in mem.items()},
            "how": "measured seconds per layer x (70B layer cost / this layer cost), cost = sum over projections of "
                   "out*in^2 + tokens*in*(in+out); memory from the parts of the largest layer, not measured",
        }
    peer = next((r for r in results if r["name"] == "gptqmodel"), None)
    for r in results:
        if peer and r is not peer:
            r["time_vs_gptqmodel"] = round(r["seconds"] / peer["seconds"], 3)
            r["memory_vs_gptqmodel"] = round(r["peak_memory_mb"] / peer["peak_memory_mb"], 3)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_flags(), "cores": os.cpu_count(), "model": str(args.model),
            "settings": {k: str(v) for k, v in vars(args).items() if k not in ("peer_run", "json", "work")},
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "summary": summary, "results": results}, indent=2) + "\n")
    print(f"{summary['model_mb']} MB model, {summary['layers']} layers, {tokens} calibration tokens; {meta['cpu']}")
    print("| configuration | seconds | peak MB | s/layer | vs GPTQModel (time, memory) |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        vs = f"{r['time_vs_gptqmodel']}, {r['memory_vs_gptqmodel']}" if "time_vs_gptqmodel" in r else "-"
        print(f"| {r['name']} | {r['seconds']} | {r['peak_memory_mb']} | {r.get('layer_seconds_mean', '-')} | {vs} |")
    for r in results:
        if "stopped_after_layers" in r:
            print(f"{r['name']}: stopped after {r['layers']} of {cfg['num_hidden_layers']} layers (seconds per layer "
                  f"{r['layer_seconds']}); the whole run extrapolated: {r['whole_run_seconds_extrapolated']} s")
    if "extrapolated_70b" in summary:
        print("70B (extrapolated):", json.dumps(summary["extrapolated_70b"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
