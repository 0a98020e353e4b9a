"""qrecover: low-bit quantization with 16-bit salient columns, recovered by noise-injected fine-tuning.

Public API:
    QuantConfig, QRecoverError
    quantize(model, out, config, ...)          load, calibrate, quantize, save (jobs.quantize)
    evaluate(path, dataset, ...)               perplexity of a checkpoint or model (jobs.evaluate)
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

Importing qrecover also registers the "qrecover" quantization method with transformers, so
AutoModelForCausalLM.from_pretrained(checkpoint) loads checkpoint format v1 (hf_quantizer).
"""
__version__ = "0.1.0"

from .config import QuantConfig
from .data import calibration_samples, eval_tokens, load_text
from .errors import QRecoverError
from .eval.perplexity import perplexity
from .eval.zeroshot import paired_difference, zeroshot
from . import hf_quantizer  # noqa: F401  (registers the transformers quantizer)
from .kernels import use_backend
from .io import load, load_checkpoint, save_checkpoint
from .jobs import evaluate, quantize
from .models import convert_gguf, load_pretrained, reference_model_dir
from .nn import QuantLinear
from .pipeline import quantize_model

__all__ = [
    "QuantConfig", "QRecoverError", "QuantLinear", "quantize", "evaluate", "quantize_model", "load",
    "load_checkpoint", "save_checkpoint", "load_pretrained", "convert_gguf", "reference_model_dir",
    "calibration_samples", "eval_tokens", "load_text", "perplexity", "zeroshot", "paired_difference",
    "use_backend",
]
