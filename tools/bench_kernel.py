"""GPU benchmark of the mixed-precision kernels (issue 4): correctness first, then timings, one bounded run.

1. Correctness on the GPU: triton "fused" and "dequantize" against torch_ref in float64, bits 2/3/4/8,
   float16 and bfloat16, odd shapes, act-order g_idx; the output poisoned with NaN first. Any failure
   stops the run (exit 1) before timing.
2. Device-to-device copy bandwidth (bytes read + written per second): the yardstick.
3. LLaMA-2-7B shapes (4096x4096, 4096x11008, 11008x4096, as in x out) at M = 1, 4, 16, 64, 512, 2048,
   w4/w3/w2 (g128) with k = 0 and k = 128 salient columns: the fused kernel (salient columns fused in),
   dequantize + cuBLAS (salient rows written into the dequantized weight), what "auto" picks, and at
   M <= 16 with k = 128 the fused kernel without the columns plus a torch addmm for them (the
   unfused alternative). Baselines: fp16 torch.matmul (cuBLAS) and, if GPTQModel is installed, its
   Marlin (w4, g128, k = 0, symmetric). Each time is the median over CUDA-graph replays of many calls
   that rotate through enough copies of weights and inputs to overflow L2, so no call hits a cache
   its predecessor warmed; achieved bandwidth = bytes the call must move / time, and its fraction of
   the copy bandwidth.
4. Decode tokens/s of a LLaMA-2-7B-shaped model with random weights (32 layers unless --layers),
   greedy with a static KV cache, one token per step captured in a CUDA graph (eager if capture fails):
   fp16 against qrecover w4 and w3 (g128, k = 128).

    python3 tools/bench_kernel.py                # everything, a few minutes on an H100
    python3 tools/bench_kernel.py --quick        # w4 only, M = 1, 16, 2048, 8-layer decode model

Writes JSON (default runs/bench_kernel.json), prints tables and the issue's targets, pass or fail.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
MS = [1, 4, 16, 64, 512, 2048]
GROUP = 128
# (M, K, N, group_size, act_order): decode, odd sizes, partial and per-channel groups, desc_act
CORRECTNESS_CASES = [(1, 4096, 4096, 128, False), (5, 576, 200, 128, False), (33, 1100, 70, 32, True),
                     (300, 4096, 1000, -1, False)]


def make_layer(K, N, bits, k, device, group_size=GROUP, act_order=False, sym=False, dtype=torch.float16):
    """A random QuantLinear as checkpoint format v1 allows (codes at salient columns are the zero)."""
    from qrecover.nn import QuantLinear
    from qrecover.format import pack_codes

    n_groups = 1 if group_size == -1 else math.ceil(K / group_size)
    g_idx = torch.arange(K, device=device) // (K if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, device=device)]
    if sym:
        stored = torch.full((n_groups, N), 2 ** (bits - 1) - 1, device=device)
    else:
        stored = torch.randint(0, 2**bits - 1, (n_groups, N), device=device)
    codes = torch.randint(0, 2**bits, (K, N), device=device)
    salient_idx = torch.randperm(K, device=device)[:k].sort().values
    codes[salient_idx] = stored[g_idx[salient_idx]] + 1
    layer = QuantLinear(K, N, bits, n_groups, k, False, dtype).to(device)
    layer.qweight.copy_(pack_codes(codes, bits))
    layer.qzeros.copy_(pack_codes(stored.t(), bits).t())
    layer.scales.copy_(torch.rand(n_groups, N, device=device) * 0.02 / 2**bits + 1e-4)
    layer.g_idx.copy_(g_idx)
    layer.salient_idx.copy_(salient_idx)
    layer.salient_weight.data.copy_(torch.randn(N, k, device=device) * 0.02)
    return layer


def layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales, layer.salient_idx, layer.salient_weight))


def gpu_time_us(calls, graph_calls=24, samples=12) -> tuple[float, str]:
    """Median GPU time of one call, from CUDA-graph replays of graph_calls calls that cycle through
    calls (eager events around batches if the capture fails; then host overhead may count)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up where the graph is captured: compiles, caches, workspaces
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(graph_calls):
                calls[i % len(calls)]()
        run, mode = graph.replay, "cuda-graph"
    except Exception as e:  # noqa: BLE001: report and time eagerly instead
        torch.cuda.synchronize()

        def run():
            for i in range(graph_calls):
                calls[i % len(calls)]()

        mode = f"eager ({type(e).__name__})"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / graph_calls)
    return statistics.median(times), mode


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us, _ = gpu_time_us([lambda: dst.copy_(src)], graph_calls=4, samples=10)
    return 2 * src.numel() / (us * 1e-6)


def check_correctness(device) -> list[dict]:
    from qrecover.format import dequantize_weight
    from qrecover.kernels import torch_ref, triton_mm

    results = []
    for bits in (2, 3, 4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            for M, K, N, group_size, act_order in CORRECTNESS_CASES:
                layer = make_layer(K, N, bits, 16, device, group_size, act_order, dtype=torch.bfloat16)
                x = torch.randn(M, K, device=device, dtype=dtype)
                x64 = x.double()
                dense = dequantize_weight(layer.qweight, layer.qzeros, layer.scales.to(dtype), layer.g_idx,
                                          bits, K, layer.zero_offset, torch.float64)
                ref = torch_ref.add_columns(x64 @ dense, x64, layer.salient_idx, layer.salient_weight.to(dtype).double(), None)
                for method in ("fused", "dequantize"):
                    out = torch.full((M, N), float("nan"), device=device, dtype=dtype)
                    y = triton_mm.forward(layer, x, out=out, method=method).double()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    ok = bool(torch.isfinite(y).all()) and err < (2e-2 if dtype == torch.bfloat16 else 4e-3)
                    results.append(dict(bits=bits, dtype=str(dtype), M=M, K=K, N=N, group_size=group_size,
                                        act_order=act_order, method=method, rel_error=err, ok=ok))
    clean = all(not s.any() and not a.any() for s, a in triton_mm._workspaces.values())
    results.append(dict(check="split-K workspace left zeroed", ok=clean))
    return results


def marlin_call(layer, x):
    """GPTQModel's Marlin on the same (symmetric, w4, g128, k = 0) weights, or raises why not."""
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    K, N = layer.in_features, layer.out_features
    m = MarlinLinear(bits=4, group_size=GROUP, desc_act=False, sym=True, in_features=K, out_features=N, bias=False)
    m = m.to(x.device)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(m, name).data.copy_(getattr(layer, name))
    m.post_init()
    m.eval()
    return lambda: m(x)


def bench_shapes(args, copy_bw: float) -> list[dict]:
    from qrecover.kernels import triton_mm

    device = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    bits_list = [4] if args.quick else [4, 3, 2]
    ms = [1, 16, 2048] if args.quick else MS
    rows = []

    def copies_for(nbytes):  # enough distinct operands that each call streams from HBM
        return max(2, min(16, math.ceil(3 * l2 / nbytes)))

    def add(row, us, mode, nbytes):
        row.update(us=us, timing=mode, bytes=nbytes, tb_per_s=nbytes / (us * 1e-6) / 1e12, of_copy=nbytes / (us * 1e-6) / copy_bw)
        rows.append(row)
        print(f"{row['shape']:>11} M={row['M']:<5} {row['kernel']:<34} {us:9.1f} us  {row['of_copy']:6.1%} of copy bw  [{mode}]", flush=True)

    for K, N in SHAPES:
        shape = f"{K}x{N}"
        weights16 = [torch.randn(K, N, device=device, dtype=torch.float16) * 0.02 for _ in range(copies_for(2 * K * N))]
        for M in ms:
            xs = [torch.randn(M, K, device=device, dtype=torch.float16) for _ in range(len(weights16))]
            us, mode = gpu_time_us([lambda w=w, x=x: x @ w for w, x in zip(weights16, xs)])
            add(dict(shape=shape, M=M, kernel="fp16 cuBLAS", bits=16, k=0), us, mode, 2 * (K * N + M * K + M * N))
        del weights16
        for bits in bits_list:
            for k in (0, 128):
                one = layer_bytes(make_layer(K, N, bits, k, device))
                layers = [make_layer(K, N, bits, k, device) for _ in range(copies_for(one))]
                bare = [make_layer(K, N, bits, 0, device) for _ in range(len(layers))] if k else []
                for M in ms:
                    xs = [torch.randn(M, K, device=device, dtype=torch.float16) for _ in range(len(layers))]
                    io = 2 * (M * K + M * N)
                    methods = ["fused"] + (["dequantize"] if M >= 64 else [])
                    for method in methods:
                        us, mode = gpu_time_us([lambda l=l, x=x, m=method: triton_mm.forward(l, x, method=m) for l, x in zip(layers, xs)])
                        picked = "fused" if M <= triton_mm.FUSED_MAX_M else "dequantize"
                        name = f"w{bits} k={k} {method}" + (" (auto)" if method == picked else "")
                        add(dict(shape=shape, M=M, kernel=name, bits=bits, k=k, method=method, auto=method == picked), us, mode, one + io)
                    if k and M <= 16:  # the salient columns as a separate torch addmm instead of fused
                        def unfused(b, l, x):
                            return triton_mm.forward(b, x).addmm_(x[:, l.salient_idx.long()], l.salient_weight.t())
                        us, mode = gpu_time_us([lambda b=b, l=l, x=x: unfused(b, l, x) for b, l, x in zip(bare, layers, xs)])
                        add(dict(shape=shape, M=M, kernel=f"w{bits} k={k} fused k=0 + addmm", bits=bits, k=k, method="unfused"), us, mode, one + io)
                del layers, bare
        # Marlin: w4 g128 k = 0, symmetric (its uint4b8 type has the zero point 8 built in)
        layers = [make_layer(K, N, 4, 0, device, sym=True) for _ in range(copies_for(K * N // 2))]
        for M in ms:
            xs = [torch.randn(M, K, device=device, dtype=torch.float16) for _ in range(len(layers))]
            try:
                calls = [marlin_call(l, x) for l, x in zip(layers, xs)]
                ours = triton_mm.forward(layers[0], xs[0]).float()
                diff = float((calls[0]().float() - ours).abs().max() / ours.abs().max())
                us, mode = gpu_time_us(calls)
                add(dict(shape=shape, M=M, kernel="Marlin w4 k=0 (GPTQModel)", bits=4, k=0, rel_diff_vs_ours=diff), us, mode,
                    layer_bytes(layers[0]) + 2 * (M * K + M * N))
            except Exception as e:  # noqa: BLE001: not installed, not built, or refused: say so
                rows.append(dict(shape=shape, M=M, kernel="Marlin w4 k=0 (GPTQModel)", unavailable=f"{type(e).__name__}: {e}"[:300]))
                print(f"{shape:>11} M={M:<5} Marlin unavailable: {rows[-1]['unavailable']}", flush=True)
                break
        del layers
        torch.cuda.empty_cache()
    return rows


def llama_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def quantize_randomly(model, bits: int, k: int) -> None:
    """Replace every decoder linear by a random QuantLinear of the same shape (speed only)."""
    from qrecover.models import quantizable_linears

    device = model.lm_head.weight.device
    for name, linear in quantizable_linears(model).items():
        model.set_submodule(name, make_layer(linear.in_features, linear.out_features, bits, k, device))


def decode_tokens_per_s(model, steps: int, graph: bool, prompt: int = 32) -> tuple[float, str]:
    """Greedy decode steps per second, batch 1, static KV cache; one step in a CUDA graph if graph."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
        out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt], device=device)

        def step():
            return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits

        run, mode = step, "eager"
        if graph:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    step()
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    logits = step()
                run, mode = (lambda: (g.replay(), logits)[1]), "cuda-graph"
            except Exception as e:  # noqa: BLE001: fall back to eager, and say so
                torch.cuda.synchronize()
                mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
        for _ in range(2):  # warm-up
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            token.copy_(run()[:, -1:].argmax(-1))
            position += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - start), mode


def bench_decode(args) -> list[dict]:
    from transformers import LlamaForCausalLM

    layers = 8 if args.quick else args.layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_7b_config(layers)).half().eval()
    rows = []
    for name, bits in [("fp16", None), ("qrecover w4 g128 k=128", 4), ("qrecover w3 g128 k=128", 3)]:
        if bits:
            quantize_randomly(model, bits, 128)
            torch.cuda.empty_cache()
        tps, mode = decode_tokens_per_s(model, args.decode_steps, graph=True)
        rows.append(dict(model=name, layers=layers, tokens_per_s=tps, mode=mode,
                         gpu_memory_gb=torch.cuda.max_memory_allocated() / 2**30))
        print(f"decode {name}: {tps:.1f} tokens/s [{mode}]", flush=True)
        if args.quick and bits == 4:
            break
    return rows


def targets(kernels: list[dict], decode: list[dict]) -> list[dict]:
    """The issue's targets, where this run measured what they need."""
    def t(shape, M, kernel):
        for r in kernels:
            if r["shape"] == shape and r["M"] == M and r["kernel"] == kernel and "us" in r:
                return r["us"]
        return None

    out = []
    fp16 = t("4096x11008", 1, "fp16 cuBLAS")
    for bits, need in ((4, 3.0), (3, 3.5), (2, 4.5)):
        ours = t("4096x11008", 1, f"w{bits} k=128 fused (auto)")
        if fp16 and ours:
            out.append(dict(target=f"M=1 4096x11008 w{bits} k=128 >= {need}x faster than fp16", value=fp16 / ours, ok=fp16 / ours >= need))
    for r in kernels:
        if r.get("M") == 1 and r.get("auto") and "of_copy" in r:
            out.append(dict(target=f"M=1 {r['shape']} {r['kernel']} >= 70% of copy bandwidth", value=r["of_copy"], ok=r["of_copy"] >= 0.7))
    for shape, _ in [(f"{K}x{N}", None) for K, N in SHAPES]:
        marlin, ours = t(shape, 1, "Marlin w4 k=0 (GPTQModel)"), t(shape, 1, "w4 k=0 fused (auto)")
        if marlin and ours:
            out.append(dict(target=f"M=1 {shape} w4 k=0 <= 1.15x Marlin's time", value=ours / marlin, ok=ours / marlin <= 1.15))
        base = t(shape, 2048, "fp16 cuBLAS")
        for r in kernels:
            if r.get("shape") == shape and r.get("M") == 2048 and r.get("auto") and base:
                out.append(dict(target=f"M=2048 {shape} {r['kernel']} <= 1.2x fp16 time", value=r["us"] / base, ok=r["us"] / base <= 1.2))
    speeds = {r["model"]: r["tokens_per_s"] for r in decode}
    if "fp16" in speeds and "qrecover w4 g128 k=128" in speeds:
        ratio = speeds["qrecover w4 g128 k=128"] / speeds["fp16"]
        out.append(dict(target="7B-shaped decode: w4 >= 2.5x fp16 tokens/s", value=ratio, ok=ratio >= 2.5))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="w4 only, M = 1, 16, 2048, an 8-layer decode model")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped decode model")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_kernel.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False). "
                 "The CPU numbers come from tools/bench_cpu_decode.py.")
    try:
        import triton
    except ImportError:
        sys.exit("bench_kernel.py needs triton: pip install 'qrecover[triton]'")
    from qrecover import kernels

    start = time.time()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    report = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(["python3", *sys.argv]),
                  device=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), quick=args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}", flush=True)

    with kernels.use_backend("triton"):
        report["correctness"] = check_correctness(device)
        bad = [r for r in report["correctness"] if not r["ok"]]
        print(f"correctness: {len(report['correctness']) - len(bad)} of {len(report['correctness'])} checks pass", flush=True)
        if bad:
            out.write_text(json.dumps(report, indent=2))
            for r in bad:
                print("FAILED", r)
            print(f"wrote {out}; no timings: the kernels are wrong on this GPU")
            return 1
        report["copy_bandwidth_tb_per_s"] = copy_bandwidth() / 1e12
        print(f"device-to-device copy: {report['copy_bandwidth_tb_per_s']:.2f} TB/s (read + write)", flush=True)
        report["kernels"] = bench_shapes(args, report["copy_bandwidth_tb_per_s"] * 1e12)
        report["decode"] = [] if args.skip_decode else bench_decode(args)
    report["targets"] = targets(report["kernels"], report["decode"])
    report["seconds"] = time.time() - start
    out.write_text(json.dumps(report, indent=2))

    print("\n| shape | M | kernel | us | TB/s | of copy bw |\n|---|---|---|---|---|---|")
    for r in report["kernels"]:
        if "us" in r:
            print(f"| {r['shape']} | {r['M']} | {r['kernel']} | {r['us']:.1f} | {r['tb_per_s']:.2f} | {r['of_copy']:.0%} |")
    print("\n| decode model | tokens/s | mode |\n|---|---|---|")
    for r in report["decode"]:
        print(f"| {r['model']} ({r['layers']} layers) | {r['tokens_per_s']:.1f} | {r['mode']} |")
    print("\n| target | value | met |\n|---|---|---|")
    for r in report["targets"]:
        print(f"| {r['target']} | {r['value']:.2f} | {'yes' if r['ok'] else 'NO'} |")
    print(f"\nwrote {out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
