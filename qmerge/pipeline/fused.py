"""Dequantize + LoRA + cast, a block of rows at a time (pure tensor code).

Same math as the whole-tensor path: each output element is dequant(W) + scaling * (B @ A) in fp32, rounded
once to the output dtype; the rows of a block are finished while they are still in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..dtypes import check_finite_cast
from ..lora.delta import add_lora_

FUSED_ELEMENTS = 1 << 18  # elements per row block: about 1 MiB of fp32


def fused_lora(
    rows: Callable[[int], Iterator[tuple[int, int, torch.Tensor]]],
    shape: tuple[int, int],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    out_dtype: torch.dtype,
    name: str = "",
) -> torch.Tensor:
    """The dequantized weight (rows(n) yields its fp32 rows n at a time) + scaling * B @ A, in out_dtype:
    [out, in] from A [r, in], B [out, r]. A block whose cast overflows is refused (dtypes.cast_finite)."""
    out = torch.empty(shape, dtype=out_dtype)
    for r0, r1, w in rows(max(1, FUSED_ELEMENTS // shape[1])):
        out[r0:r1] = add_lora_(w, lora_A, lora_B[r0:r1], scaling)
        check_finite_cast(w, out_dtype, name)
    return out
