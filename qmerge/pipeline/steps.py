"""How each tensor of the output model is made, decided once per tensor before anything is computed.

A step starts from the base (Copy a 16-bit tensor, Dequantize a 4-bit one, Replace it with an adapter
tensor) and may change it (AddLoRA, DoRA, AddBias, SetRows); FusedLoRA does Dequantize + AddLoRA + cast a block of
rows at a time when nothing else needs the whole fp32 weight. Math lives in lora/ and quant/; a step
says which pieces to combine and which stored tensors it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.adapter import LoraModule
from ..lora.delta import add_lora_, dora_merge, embedding_delta, lora_delta
from ..lora.scaling import module_scaling
from .fused import fused_lora
from .source import Source

Reads = list[tuple[str, str]]  # ("base" | "adapter", stored key)


@dataclass(frozen=True)
class Copy:
    """A tensor of the base as stored (key differs from the output name for an untied copy)."""

    key: str
    merged = False

    def reads(self, source: Source) -> Reads:
        return [("base", self.key)]

    def run(self, source: Source, dtype: torch.dtype | None) -> torch.Tensor:
        raw = source.base.store.get(self.key)
        return raw.to(dtype or torch.float32) if raw.is_floating_point() else raw


@dataclass(frozen=True)
class Dequantize:
    """A weight that was 4-bit in training, dequantized exactly as bitsandbytes does."""

    name: str
    merged = False

    def reads(self, source: Source) -> Reads:
        return [("base", k) for k in source.weights.stored_parts(self.name)]

    def run(self, source: Source, dtype: torch.dtype | None) -> torch.Tensor:
        return source.weights.dequantized(self.name, dtype)


@dataclass(frozen=True)
class Replace:
    """A whole tensor the adapter saved (modules_to_save, a saved base layer, bias="all")."""

    key: str
    merged = True

    def reads(self, source: Source) -> Reads:
        return [("adapter", self.key)]

    def run(self, source: Source, dtype: torch.dtype | None) -> torch.Tensor:
        return source.adapter_tensor(self.key)


@dataclass(frozen=True)
class FusedLoRA:
    """A 4-bit weight plus a plain linear LoRA, dequantized, merged and cast a block of rows at a time."""

    name: str
    lora: LoraModule
    scaling: float
    merged = True

    def reads(self, source: Source) -> Reads:
        return Dequantize(self.name).reads(source) + [("adapter", k) for k in self.lora.keys]

    def run(self, source: Source, dtype: torch.dtype | None) -> torch.Tensor:
        A, B = source.adapter_tensor(self.lora.lora_A), source.adapter_tensor(self.lora.lora_B)
        shape, _ = source.weights.state_shape(self.name)
        return fused_lora(
            lambda n: source.weights.rows(self.name, n), shape, A, B, self.scaling, dtype, self.name
        )


@dataclass(frozen=True)
class Change:
    """A change the adapter makes to a weight that `base` produces (in fp32)."""

    base: Copy | Dequantize | Replace
    merged = True

    def reads(self, source: Source) -> Reads:
        return self.base.reads(source) + [("adapter", k) for k in self.keys]

    @property
    def keys(self) -> list[str]:
        raise NotImplementedError

    def run(self, source: Source, dtype: torch.dtype | None) -> torch.Tensor:
        return self.apply(source, self.base.run(source, None))

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class AddLoRA(Change):
    """weight + scaling * B @ A (in place), or the embedding delta (B @ A).T."""

    lora: LoraModule = None
    scaling: float = 1.0
    fan_in_fan_out: bool = False

    @property
    def keys(self) -> list[str]:
        return [self.lora.lora_A, self.lora.lora_B]

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        A, B = source.adapter_tensor(self.lora.lora_A), source.adapter_tensor(self.lora.lora_B)
        if self.lora.kind == "embedding":
            return weight + embedding_delta(A, B, self.scaling)
        return add_lora_(weight, A, B, self.scaling, self.fan_in_fan_out)  # no delta-sized temporary


@dataclass(frozen=True)
class DoRA(Change):
    """magnitude / ||W + delta||_row * (W + delta) (rows are columns with fan_in_fan_out)."""

    lora: LoraModule = None
    scaling: float = 1.0
    fan_in_fan_out: bool = False

    @property
    def keys(self) -> list[str]:
        return [self.lora.lora_A, self.lora.lora_B, self.lora.magnitude]

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        A, B = source.adapter_tensor(self.lora.lora_A), source.adapter_tensor(self.lora.lora_B)
        delta = lora_delta(A, B, self.scaling, self.fan_in_fan_out)
        magnitude = source.adapter_tensor(self.lora.magnitude)
        if self.fan_in_fan_out:
            return dora_merge(weight.T, delta.T, magnitude).T.contiguous()
        return dora_merge(weight, delta, magnitude)


@dataclass(frozen=True)
class AddBias(Change):
    """bias + scaling * lora_B.bias (PEFT's lora_bias)."""

    key: str = ""
    scaling: float = 1.0

    @property
    def keys(self) -> list[str]:
        return [self.key]

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        return weight + source.adapter_tensor(self.key) * self.scaling


@dataclass(frozen=True)
class SetRows(Change):
    """PEFT's trainable tokens: the rows of the given token ids replaced by the adapter's (index_copy)."""

    key: str = ""
    indices: tuple[int, ...] = ()

    @property
    def keys(self) -> list[str]:
        return [self.key]

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        rows = source.adapter_tensor(self.key).to(weight.dtype)
        return weight.index_copy(0, torch.tensor(self.indices), rows)


@dataclass(frozen=True)
class AddParamDelta(Change):
    """weight + its part of a LoRA on a parameter (target_parameters: MoE experts, a router), the delta
    made on the model parameter as PEFT makes it and split into the stored tensors (params.py)."""

    name: str = ""

    def reads(self, source: Source) -> Reads:
        return self.base.reads(source) + [("adapter", k) for k in source.param_deltas.keys_of(self.name)]

    def apply(self, source: Source, weight: torch.Tensor) -> torch.Tensor:
        return weight.add_(source.param_deltas.delta(self.name).to(weight.device))


Step = Copy | Dequantize | Replace | FusedLoRA | Change


def plan_steps(
    source: Source, dtypes: dict[str, torch.dtype | None], keep_base: bool = False
) -> dict[str, Step]:
    """{output tensor: its step}, for the tensors in `dtypes` (each floating tensor produced in its dtype;
    None: fp32). With keep_base every change keeps its input apart (no fused path)."""
    by_weight = {m.weight: m for m in source.layout.lora.values()}
    by_bias = {m.module + ".bias": m for m in source.layout.lora.values() if m.lora_B_bias}
    return {
        name: decide(source, name, by_weight.get(name), by_bias.get(name), dtype, keep_base)
        for name, dtype in dtypes.items()
    }


def decide(
    source: Source,
    name: str,
    lora: LoraModule | None,
    bias_of: LoraModule | None,
    dtype: torch.dtype | None,
    keep_base: bool,
) -> Step:
    """The step that makes output tensor `name`."""
    replaced = name in source.layout.replace
    four_bit = not replaced and source.weights.is_4bit(name)
    conv1d = name in source.conv1d
    if dtype is not None and not keep_base and four_bit and not conv1d and _fusable(source, name, lora):
        return FusedLoRA(name, lora, module_scaling(source.settings, lora.module))
    if replaced:
        start = Replace(source.layout.replace[name])
    elif four_bit:
        start = Dequantize(name)
    else:
        start = Copy(source.aliases.get(name, name))  # an untied copy starts from its source
    if lora is not None:
        scaling, fifo = module_scaling(source.settings, lora.module), source.settings.fan_in_fan_out
        if lora.magnitude is not None:
            return DoRA(start, lora, scaling, fifo)
        return AddLoRA(start, lora, scaling, fifo)
    if bias_of is not None:
        return AddBias(start, bias_of.lora_B_bias, module_scaling(source.settings, bias_of.module))
    if name in source.layout.rows:
        return SetRows(start, *source.layout.rows[name])
    if source.layout.params and name in source.param_deltas:
        return AddParamDelta(start, name)
    return start


def _fusable(source: Source, name: str, lora: LoraModule | None) -> bool:
    """A plain linear LoRA on a 2-D 4-bit weight whose rows are whole blocks."""
    if lora is None or lora.kind != "linear" or lora.magnitude is not None or source.settings.fan_in_fan_out:
        return False
    shape, blocksize = source.weights.state_shape(name)
    return len(shape) == 2 and shape[1] % blocksize == 0
