"""Dequantize + LoRA + cast, a block of rows at a time (pure tensor code).

Same math as the whole-tensor path: each output element is dequant(W) + scaling * (B @ A) in fp32, rounded
once to the output dtype; the rows of a block are finished while they are still in cache.
"""

from __future__ import annotations

import torch

from ..lora.delta import add_lora_
from ..quant.blockwise import QuantState, dequantize_rows

FUSED_ELEMENTS = 1 << 18  # elements per row block: about 1 MiB of fp32


def fused_lora(
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """dequantize_4bit(packed, state) (rounded to state.dtype, as bitsandbytes) + scaling * B @ A, in
    out_dtype: [out, in] from A [r, in], B [out, r]. The rows of `state.shape` must be whole blocks."""
    rows, cols = state.shape
    out = torch.empty(rows, cols, dtype=out_dtype)
    step = max(1, FUSED_ELEMENTS // cols)
    for r0, r1, w in dequantize_rows(packed, state, step, round_to=state.dtype):
        out[r0:r1] = add_lora_(w, lora_A, lora_B[r0:r1], scaling)
    return out
