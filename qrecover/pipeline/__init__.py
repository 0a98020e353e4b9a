"""Layer-by-layer quantization: the driver over a model in memory or streamed from its shards
(driver.py), one decoder layer at a time (layer.py), activations within a memory budget
(activations.py), progress that resumes (progress.py)."""
from .driver import quantize_model
from .layer import LayerPasses, capture_inputs, quantize_layer, quantize_linears
from .progress import layer_file

__all__ = ["LayerPasses", "capture_inputs", "quantize_layer", "layer_file", "quantize_linears", "quantize_model"]
