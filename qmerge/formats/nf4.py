"""The merged weights requantized to NF4/FP4 with qmerge's codec (bit-exact with bitsandbytes) and written
exactly as transformers saves a bitsandbytes 4-bit model, with how much of the LoRA delta survived."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import dtypes
from ..io.bnb import planned_entries, quantization_config, state_tensors
from ..io.hf_dir import output_config
from ..io.safetensors import DTYPE_NAMES, PlannedTensor
from ..pipeline.source import Source
from ..pipeline.stream import MergedTensor
from ..quant.blockwise import dequantize_4bit, quantize_4bit
from .options import NF4Options
from .write import Layout


@dataclass
class Retention:
    """How much of each layer's LoRA delta survives requantization."""

    layers: dict[str, dict] = field(default_factory=dict)
    dot: float = 0.0
    delta_sq: float = 0.0
    err_sq: float = 0.0

    def add(self, name: str, base: torch.Tensor, merged: torch.Tensor, requantized: torch.Tensor) -> None:
        delta = (merged - base).double()
        realized = (requantized - base).double()
        dsq = float((delta * delta).sum())
        if dsq == 0:
            return
        dot = float((realized * delta).sum())
        esq = float(((requantized - merged).double() ** 2).sum())
        self.layers[name] = {"kept": dot / dsq, "error_over_delta": (esq / dsq) ** 0.5}
        self.dot += dot
        self.delta_sq += dsq
        self.err_sq += esq

    def summary(self) -> dict | None:
        if not self.layers:
            return None
        worst = min(self.layers, key=lambda k: self.layers[k]["kept"])
        return {
            "definition": "kept = <Q - W0, delta> / ||delta||^2: the share of the LoRA delta, along its own "
            "direction, that the requantized weight Q still carries over the base W0 (1 = all, 0 = none)",
            "total": self.dot / self.delta_sq,
            "error_over_delta": (self.err_sq / self.delta_sq) ** 0.5,
            "worst_layer": worst,
            "worst": self.layers[worst]["kept"],
            "layers": self.layers,
        }


class NF4:
    """The layers 4-bit in training requantized; every other floating tensor in the compute dtype."""

    def __init__(self, opts: NF4Options = NF4Options()):
        self.opts = opts
        self.dtype = dtypes.option_dtype(opts.compute_dtype)
        self.retention = Retention()
        self._quantized: frozenset[str] = frozenset()
        self._conv1d: frozenset[str] = frozenset()

    def layout(self, source: Source) -> Layout:
        o = self.opts
        self._quantized, self._conv1d = source.weights.quantized_names(), source.conv1d
        entries: list[PlannedTensor] = []
        nbytes: dict[str, int] = {}
        for spec in source.tensors.values():
            if spec.name in self._quantized:
                shape = (
                    tuple(reversed(spec.shape)) if spec.name in self._conv1d else spec.shape
                )  # as transformers
                mine = planned_entries(
                    spec.name, shape, o.blocksize, o.double_quant, o.quant_type, self.dtype
                )
            else:
                mine = [
                    PlannedTensor(
                        spec.name, DTYPE_NAMES[self.dtype if spec.floating else spec.stored], spec.shape
                    )
                ]
            entries += mine
            nbytes[spec.name] = sum(e.nbytes for e in mine)
        order = list(source.tensors)
        return Layout(order, dict.fromkeys(order), nbytes, entries, keep_base=True)

    def encode(self, t: MergedTensor) -> list[tuple[str, torch.Tensor]]:
        if t.name not in self._quantized:
            return [(t.name, t.value.to(self.dtype) if t.value.is_floating_point() else t.value)]
        value, base = t.value, t.base
        if t.name in self._conv1d:  # bitsandbytes holds a Conv1D weight transposed
            value, base = value.T.contiguous(), None if base is None else base.T.contiguous()
        o = self.opts
        packed, state = quantize_4bit(value.to(self.dtype), o.blocksize, o.quant_type, o.double_quant)
        if base is not None:
            self.retention.add(t.name, base, value, dequantize_4bit(packed, state).float())
        return state_tensors(t.name, packed, state)

    def config(self, source: Source) -> dict:
        cfg = output_config(source.config, self.dtype)
        skip = (source.base.quantization_config or {}).get("llm_int8_skip_modules")
        cfg["quantization_config"] = quantization_config(
            self.dtype, self.opts.quant_type, self.opts.double_quant, skip
        )
        return cfg

    def settings(self) -> dict:
        return {"export": "nf4", "nf4": self.opts.__dict__}

    def details(self) -> dict:
        summary = self.retention.summary()
        return {"delta_retention": summary} if summary else {}
