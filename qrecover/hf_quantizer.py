"""Loading checkpoint format v1 through transformers: `AutoModelForCausalLM.from_pretrained(path)`.

Imported when transformers is (qrecover.registration), it registers under the quant_method
"qrecover" a quantization config that keeps config.json's entry verbatim and a quantizer that,
while transformers builds the model skeleton on the meta device, swaps every quantizable linear for
an empty QuantLinear shaped after the checkpoint's tensor headers (io.install_quant_linears).
transformers' own loader then fills those layers in like any other weights, so `generate`,
`pipeline(...)`, device maps and lm-eval's `--model hf` work unchanged; qrecover.load_checkpoint is
this same path with its checks around it.

It also refuses a checkpoint whose config.json lost its quantization_config: transformers would
otherwise build an ordinary model, fill every linear with random weights and only log it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import QRecoverError
from .models.shards import read_header

METHOD = "qrecover"


@register_quantization_config(METHOD)
class QRecoverQuantizationConfig(QuantizationConfigMixin):
    """config.json's `quantization_config` as written by qrecover, kept verbatim so that
    `save_pretrained` writes it back unchanged."""

    def __init__(self, **entries):
        self.__dict__.update(entries)
        self.quant_method = METHOD


def _tensor_headers(files) -> dict:
    """{name: empty meta tensor with the stored shape and dtype} of safetensors files, without reading data."""
    return {name: torch.empty(shape, dtype=dtype, device="meta")
            for file in files for name, (shape, dtype) in read_header(file).items()}


# Tensors only a packed (qrecover or GPTQ) layer holds: unexpected in an ordinary model.
PACKED_TENSORS = ("qweight", "qzeros", "salient_idx", "salient_weight")


def refuse_packed_tensors(keys, path) -> None:
    """Refuse to load packed tensors into an ordinary model: its config lost its quantization_config."""
    packed = sorted(k for k in keys if k.rsplit(".", 1)[-1] in PACKED_TENSORS)
    if packed:
        raise QRecoverError(
            f"{path} holds quantized tensors ({', '.join(packed[:3])}{' ...' if len(packed) > 3 else ''}) but its "
            "config.json has no quantization_config, so they would load as an ordinary model with random weights: "
            "restore config.json from the checkpoint as qrecover wrote it (its quantization_config has quant_method qrecover)"
        )


_finalize_model_loading = PreTrainedModel._finalize_model_loading


def _finalize_refusing_packed_tensors(model, load_config, loading_info):
    # transformers reports unexpected weights only in a log line; this is the one place where every
    # from_pretrained has them, before the missing weights get their random initialization.
    if load_config.hf_quantizer is None:
        refuse_packed_tensors(loading_info.unexpected_keys, load_config.pretrained_model_name_or_path)
    return _finalize_model_loading(model, load_config, loading_info)


PreTrainedModel._finalize_model_loading = staticmethod(_finalize_refusing_packed_tensors)


@register_quantizer(METHOD)
class QRecoverHfQuantizer(HfQuantizer):
    # Only loads: quantizing goes through `qrecover quantize`, which needs calibration data.
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise QRecoverError("a qrecover checkpoint loads from its safetensors files; none were found")
        # io imports nn, kernels and models: imported here, so that registering (done when
        # transformers is imported, see qrecover/__init__) never waits on a module mid-import.
        from .io import check_quantization_config, config_from_checkpoint, install_quant_linears, zero_offset

        path = Path(checkpoint_files[0]).parent
        qc = self.quantization_config.to_dict()
        check_quantization_config(qc, path)
        install_quant_linears(model, _tensor_headers(checkpoint_files), config_from_checkpoint(qc), zero_offset(qc), path)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers' loader makes every floating parameter it fills trainable; the 16-bit
        # columns train only through `qrecover recover`, which asks for their gradients itself.
        for name, param in model.named_parameters():
            if name.endswith(".salient_weight"):
                param.requires_grad_(False)
        return model

    def is_serializable(self):
        return True  # the QuantLinear buffers are the checkpoint's tensors, under the same names

    @property
    def is_trainable(self) -> bool:
        # Recovery training of the salient columns goes through `qrecover recover`; transformers'
        # Trainer would only attach adapters, which QuantLinear does not take.
        return False
