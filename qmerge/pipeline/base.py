"""The weights training saw: 4-bit layers read from a bitsandbytes checkpoint, or reproduced from the
16-bit base exactly as bitsandbytes quantizes it when transformers loads it with a BitsAndBytesConfig."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..io.hf_dir import ModelDir
from ..quant.blockwise import QuantState, dequantize_4bit, dequantize_rows, quantize_4bit
from ..quant.reproduce import reproduce_4bit, reproduce_rows

# Threads that reproduce 4-bit row blocks from a 16-bit base ahead of the merge. Measured on 2 cores, 1.1B
# merge: 19.1 s with 1, 13.4-14.1 s with 2, 14.9-16.0 s with 3.
REPRODUCE_WORKERS = 2


@dataclass(frozen=True)
class QuantSettings:
    """How the base was quantized for training (used when the base is given in 16-bit)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dtype: torch.dtype | None = None  # dtype the base was loaded in; None: as stored
    storage: torch.dtype = torch.uint8  # bnb_4bit_quant_storage: how packed codes are held (values unchanged)


class TrainingWeights:
    """Which base tensors were 4-bit in training, and their codes, state and dequantized values.

    merge_base "dequantized" starts from those 4-bit weights; "original" from the 16-bit tensors as
    stored (only a 16-bit base has them).
    """

    def __init__(self, base: ModelDir, quant: QuantSettings, merge_base: str, conv1d: frozenset[str]):
        self.base = base
        self.quant = quant
        self.merge_base = merge_base
        self.conv1d = conv1d
        self._quantized: frozenset[str] | None = None

    def quantized_names(self) -> frozenset[str]:
        """Weights that are 4-bit in the base, or that transformers would quantize at load time."""
        if self._quantized is None:
            if self.base.is_4bit:
                self._quantized = frozenset(self.base.quantized)
            else:
                from ..io.hf_meta import quantized_linears

                skip = (self.base.quantization_config or {}).get("llm_int8_skip_modules")
                names = set(self.base.weight_names())
                quantized = quantized_linears(self.base.config, skip)
                stored_as = self.base.stored_as()  # a layout transformers renames at load: the stored names
                self._quantized = frozenset(quantized | {stored_as.get(n, n) for n in quantized}) & names
        return self._quantized

    def is_4bit(self, name: str) -> bool:
        """True when the merge starts `name` from 4-bit codes (read, or reproduced from the 16-bit base)."""
        if name in self.base.quantized:
            return True
        # merge_base first: a merged or "original" source needs no quantization rule (no transformers import)
        if self.merge_base != "dequantized" or name not in self.base.store:
            return False
        return self.base.store.dtype(name).is_floating_point and name in self.quantized_names()

    def state_shape(self, name: str) -> tuple[tuple[int, ...], int]:
        """(shape, blocksize) of the 4-bit state of `name` (a Conv1D weight's state is transposed)."""
        if name in self.base.quantized:
            e = self.base.quantized[name]
            return e.shape, e.blocksize
        shape = self.base.store.shape(name)
        return (tuple(reversed(shape)) if name in self.conv1d else shape), self.quant.blocksize

    def stored_parts(self, name: str) -> list[str]:
        return self.base.stored_parts(name)

    def _loaded(self, name: str) -> torch.Tensor:
        """A 16-bit base tensor as transformers hands it to bitsandbytes: in the training dtype, a Conv1D
        weight transposed to [out, in]."""
        tensor = self.base.store.get(name)
        loaded = tensor.to(self.quant.dtype) if self.quant.dtype is not None else tensor
        return loaded.T.contiguous() if name in self.conv1d else loaded

    def codes(self, name: str) -> tuple[torch.Tensor, QuantState]:
        """The packed 4-bit codes and state training used for `name`."""
        if name in self.base.quantized:
            return self.base.quant_state(name)
        q = self.quant
        return quantize_4bit(self._loaded(name), q.blocksize, q.quant_type, q.double_quant)

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight training saw, as bitsandbytes dequantizes it (fp32 product cast to the quant_state
        dtype), in `dtype` (default fp32), in the 16-bit checkpoint's orientation. From a 16-bit base the
        values come straight from the codes (no packing round trip)."""
        if name in self.base.quantized or self.base.store.shape(name)[-1] % self.quant.blocksize:
            packed, state = self.codes(name)
            weight = dequantize_4bit(
                packed,
                state,
                torch.float32 if name in self.conv1d else dtype or torch.float32,
                round_to=state.dtype,
            )
        else:
            q = self.quant
            weight = reproduce_4bit(self._loaded(name), q.blocksize, q.quant_type, q.double_quant)
        if name in self.conv1d:
            weight = weight.T.contiguous()
        return weight if dtype is None else weight.to(dtype)

    def rows(self, name: str, rows_per_chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(row_start, row_stop, fp32 rows) of dequantized(name) for a 2-D weight whose rows are whole
        blocks (not a Conv1D weight), a few rows at a time."""
        if name in self.base.quantized:
            packed, state = self.base.quant_state(name)
            return dequantize_rows(packed, state, rows_per_chunk, round_to=state.dtype)
        q = self.quant
        return reproduce_rows(
            self._loaded(name),
            q.blocksize,
            q.quant_type,
            q.double_quant,
            rows_per_chunk,
            workers=REPRODUCE_WORKERS,
        )
