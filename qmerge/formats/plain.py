"""The merged model as plain safetensors in bf16, fp16 or fp32: what `qmerge merge` writes."""

from __future__ import annotations

import torch

from .. import dtypes
from ..io.hf_dir import output_config
from ..io.safetensors import DTYPE_NAMES, PlannedTensor, safetensors_order
from ..pipeline.source import Source
from ..pipeline.stream import MergedTensor
from .write import Layout


class Plain:
    """Every floating tensor in one dtype, laid out as safetensors.torch.save_file lays it out."""

    def __init__(self, dtype: torch.dtype, settings: dict | None = None):
        self.dtype = dtype
        self._settings = settings or {}

    def layout(self, source: Source) -> Layout:
        entries = [
            PlannedTensor(s.name, DTYPE_NAMES[self.dtype if s.floating else s.stored], s.shape)
            for s in source.tensors.values()
        ]
        entries = safetensors_order(entries)
        return Layout(
            order=[e.name for e in entries],
            dtypes={e.name: self.dtype if source.tensors[e.name].floating else None for e in entries},
            nbytes={e.name: e.nbytes for e in entries},
            entries=entries,
        )

    def encode(self, t: MergedTensor) -> list[tuple[str, torch.Tensor]]:
        return [(t.name, t.value)]

    def config(self, source: Source) -> dict:
        embed = next((n for n in source.tensors if n.endswith("embed_tokens.weight")), None)
        vocab = source.tensors[embed].shape[0] if embed else None
        return output_config(source.config, self.dtype, vocab)

    def settings(self) -> dict:
        return {"dtype": dtypes.config_name(self.dtype), **self._settings}

    def details(self) -> dict:
        return {}
