"""A Hugging Face model directory read one part at a time, for models larger than memory.

The model is built on the meta device (accelerate's init_empty_weights: parameters take no memory,
buffers such as rotary tables are real); a part (the embeddings, one decoder layer) gets its tensors
from the safetensors files only when asked (`materialize`), each file opened with safe_open for that
read and closed again, and `release` returns the part to the meta device. Every file's header is
read up front, so a missing shard, a missing or misshapen tensor or a truncated file is an error
naming it before any work starts, not hours into a run.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import QRecoverError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors header dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def is_sharded(folder) -> bool:
    return (Path(folder) / INDEX).is_file()


class Shards:
    """Where each tensor of a model directory is stored, and its stored shape and dtype."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if is_sharded(self.folder):
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise QRecoverError(f"{self.folder / INDEX} is not a safetensors index ({e}): download it again") from e
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise QRecoverError(f"{self.folder} has neither {INDEX} nor {SINGLE}: not a safetensors model directory")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise QRecoverError(
                f"{self.folder / INDEX} names {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which "
                f"{'is' if len(missing) == 1 else 'are'} not in {self.folder}: the download is incomplete; fetch the missing shards"
            )
        self.headers: dict[str, tuple[str, tuple, torch.dtype]] = {}  # name -> (file, shape, dtype)
        for file in files:
            for name, (shape, dtype) in read_header(self.folder / file).items():
                self.headers[name] = (file, shape, dtype)
        for name, file in (weight_map or {}).items():
            if self.headers.get(name, (file,))[0] != file:
                raise QRecoverError(f"{self.folder / INDEX} places {name} in {file}, but {self.headers[name][0]} holds it: the index does not match the shards")
            if name not in self.headers:
                raise QRecoverError(f"{self.folder / INDEX} places {name} in {file}, which does not hold it: the shard is damaged or from another model; download it again")

    @property
    def total_bytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in self.headers.values())

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, as stored; each file they live in is opened once."""
        by_file = defaultdict(list)
        for name in names:
            if name not in self.headers:
                raise QRecoverError(f"{self.folder} lacks the tensor {name} (no shard holds it): the model is incomplete or not of the architecture its config.json names")
            by_file[self.headers[name][0]].append(name)
        out = {}
        for file, members in by_file.items():
            try:
                with safe_open(str(self.folder / file), framework="pt") as f:
                    for name in members:
                        # A copy: safe_open's tensors map the file, which would stay mapped (and counted
                        # in the resident set) for as long as any tensor of it lives.
                        out[name] = f.get_tensor(name).clone()
            except (SafetensorError, OSError) as e:
                raise QRecoverError(f"{self.folder / file} could not be read ({e}): the shard is damaged; download it again") from e
        return out


def read_header(path: Path) -> dict[str, tuple[tuple, torch.dtype]]:
    """{tensor name: (shape, dtype)} of a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), DTYPES[f.get_slice(name).get_dtype()]) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise QRecoverError(f"{path} is corrupted or truncated ({e}): download or write it again") from e
    except KeyError as e:
        raise QRecoverError(f"{path} holds a tensor of unknown dtype {e}: it is not a model file qrecover reads") from e


def empty_model(folder, dtype):
    """The model of a directory's config.json on the meta device, its parameters in `dtype`
    ("auto": the stored torch dtype, else float32)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise QRecoverError(f"could not build the model of {folder}/config.json: {e}") from e
    model.tie_weights()
    return model.eval()


def materialize(module: nn.Module, prefix: str, shards: Shards, device) -> None:
    """Fill every parameter and persistent buffer of a meta `module` (its names under `prefix`) from
    the shards, in the dtype the module was built with, on `device`."""
    from accelerate.utils import set_module_tensor_to_device

    wanted = {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta}
    stored = shards.read(prefix + name for name in wanted)
    for name, meta in wanted.items():
        value = stored[prefix + name]
        if tuple(value.shape) != tuple(meta.shape):
            file = shards.headers[prefix + name][0]
            raise QRecoverError(
                f"{shards.folder / file}: {prefix + name} is {list(value.shape)}, the config says {list(meta.shape)}: "
                "the shards belong to another model or config.json was edited"
            )
        set_module_tensor_to_device(module, name, device, value=value.to(meta.dtype))


def release(module: nn.Module) -> nn.Module:
    """The module's parameters and persistent buffers (what materialize fills) back on the meta
    device, freeing their memory; computed buffers (rotary tables) stay."""
    from accelerate.utils import set_module_tensor_to_device

    for name in module.state_dict(keep_vars=True):
        set_module_tensor_to_device(module, name, "meta")
    return module
