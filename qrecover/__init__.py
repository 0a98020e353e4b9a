"""qrecover: low-bit quantization with 16-bit salient columns, recovered by noise-injected fine-tuning.

Public API:
    QuantConfig, QRecoverError
    quantize(model, out, config, ...)          load, calibrate, quantize, save (api.quantize)
    evaluate(path, dataset, ...)               perplexity of a checkpoint or model (api.evaluate)
    quantize_model(model, samples, config)     the layer-by-layer driver on an in-memory model
    load(spec), load_checkpoint(path), save_checkpoint(model, tokenizer, out, config)
    load_pretrained(spec), convert_gguf(file, out_dir), reference_model_dir()
    calibration_samples(tokenizer, source, n, seqlen), eval_tokens(tokenizer, source)
    perplexity(model, tokens, seqlen, max_windows)
    QuantLinear
    use_backend(name)                          force a kernel backend in a with-block (kernels)
    zeroshot(model, tasks, limit=...)           lm-eval zero-shot accuracy; tasks "NAME" or "NAME=PATH"
    paired_difference(report_a, report_b)       a's zero-shot score minus b's, with paired standard errors
    qrecover.export.export(ckpt, out, to)       a GPTQ base + exact LoRA adapter, a dense model, or plain GPTQ

Importing qrecover also registers the "qrecover" quantization method with transformers (when
transformers is imported, see registration.py), so AutoModelForCausalLM.from_pretrained(checkpoint)
loads checkpoint format v1 (hf_quantizer). The names below are imported on first use: importing
one submodule (qrecover.format, say) loads neither transformers nor the rest of the package.
"""
from importlib import import_module

from ._version import __version__
from .registration import register_when_transformers_loads

# name -> the module that defines it
_EXPORTS = {
    "QuantConfig": "config", "QRecoverError": "errors", "QuantLinear": "nn", "quantize": "api",
    "evaluate": "api", "quantize_model": "pipeline", "load": "api", "load_checkpoint": "io",
    "save_checkpoint": "io", "load_pretrained": "models", "convert_gguf": "models",
    "reference_model_dir": "models", "calibration_samples": "data", "eval_tokens": "data",
    "load_text": "data", "perplexity": "eval.perplexity", "zeroshot": "api",
    "paired_difference": "bench.paired", "use_backend": "kernels",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qrecover' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


register_when_transformers_loads()
