"""A candidate run by the engine that would serve it: transformers for a merged directory, transformers +
bitsandbytes for an NF4 export, llama.cpp for a GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import llama_cpp
from ..errors import InputError
from ..io.hf_dir import ModelDir
from ..io.kinds import path_kind
from ..io.records import read_provenance
from ..pipeline.model import model_class_of, quiet_libraries
from .reference import model_logits


def candidate_kind(path: Path) -> str:
    """ "gguf", "nf4" (a bitsandbytes 4-bit directory) or "merged" (a 16-bit directory)."""
    kind, where = path_kind(path)
    if kind == "gguf":
        return kind
    if kind == "adapter":
        if (Path(path) / "adapter_config.json").exists() or Path(path).is_file():
            raise InputError(
                f"{path}: is an adapter; --candidate takes a merged model, an NF4 export or a GGUF file."
            )
        raise InputError(
            f"{path}: no config.json; --candidate takes a merged directory, an NF4 export or a GGUF file."
        )
    return "nf4" if ModelDir(where).quantization_config else "merged"


def candidate_logits(path: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits [n, seq, vocab] of a candidate for `tokens`, and its kind."""
    kind = candidate_kind(path)
    if kind == "gguf":
        return llama_cpp.gguf_logits(path, tokens), kind
    with quiet_libraries():
        if kind == "nf4":
            model = model_class_of(path).from_pretrained(str(path), device_map="cpu")
            model = model.dequantize().float()
        else:
            model = model_class_of(path).from_pretrained(str(path), dtype=torch.float32)
        model.eval()
    return model_logits(model, tokens), kind


def delta_retention(candidate: Path) -> float | None:
    """The delta retention qmerge recorded when it wrote an NF4 export (None for other candidates)."""
    if not Path(candidate).is_dir():
        return None
    prov = read_provenance(candidate) or {}
    return (prov.get("delta_retention") or {}).get("total")
