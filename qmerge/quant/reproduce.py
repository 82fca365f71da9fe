"""The 4-bit weights training saw, computed straight from the 16-bit tensor: the values of
dequantize_4bit(*quantize_4bit(A)) without packing the codes only to unpack them again.

Same arithmetic as the round trip, bit for bit (tested): codes from the fp32 block absmax, scales
double-quantized as bitsandbytes stores them, each value code * scale in fp32, rounded once to the dtype
the base was loaded in. Pure tensor code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

from .blockwise import (
    _CHUNK,
    _bucket_index,
    _bucket_lut,
    _sorted_code,
    dequantize_absmax,
    quantize_state,
)
from .codebooks import code_4bit


def _value_table(quant_type: str) -> torch.Tensor:
    """fp32[16]: the value of each sorted-code index (FP4 through its sort order, 0b1000 as -0.0 as the
    kernels decode it)."""
    code = code_4bit(quant_type).float().clone()
    if quant_type == "fp4":
        code[8] = -0.0
    _, order = _sorted_code(quant_type)
    return code[order]


@lru_cache(maxsize=2)
def _value_lut(quant_type: str) -> torch.Tensor:
    """int64[65536]: for each of _bucket_lut's ranges, the fp32 bits of the code value below its midpoint
    and of the one above (the same where the range holds no midpoint), packed low | high << 32."""
    count, midpoint = _bucket_lut(quant_type)
    values = torch.cat([_value_table(quant_type), torch.zeros(1)])
    c = count.long()
    low, high = values[c], torch.where(midpoint < float("inf"), values[c + 1], values[c])
    return (low.view(torch.int32).long() & 0xFFFFFFFF) | (high.view(torch.int32).long() << 32)


def _values(x: torch.Tensor, blocksize: int, quant_type: str, am: torch.Tensor) -> torch.Tensor:
    """fp32 code values (not yet scaled) of fp32 x's whole blocks, given their fp32 absmax `am`, x scaled in
    place on the way: the values of the codes _codes_full_blocks gives, without the codes (two gathers, one
    select)."""
    _, midpoint = _bucket_lut(quant_type)
    blocks = x.view(-1, blocksize)
    y = blocks.mul_((1.0 / am.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    index = _bucket_index(y)
    both = torch.index_select(_value_lut(quant_type), 0, index).view(torch.float32).view(-1, 2)
    return torch.where(y > torch.index_select(midpoint, 0, index), both[:, 1], both[:, 0])


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    out = torch.empty(flat.numel() // blocksize, dtype=torch.float32)
    for s in range(0, flat.numel(), _CHUNK):
        x = flat[s : s + _CHUNK].float().view(-1, blocksize)
        out[s // blocksize : s // blocksize + len(x)] = x.abs().amax(dim=-1)
    return out


def reproduce_rows(
    A: torch.Tensor,
    blocksize: int,
    quant_type: str,
    double_quant: bool,
    rows_per_chunk: int,
    round_to: torch.dtype | None = None,
    workers: int = 1,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (row_start, row_stop, fp32 rows) of the dequantized 4-bit form of 2-D A (rows whole blocks):
    the same values as dequantize_4bit(*quantize_4bit(A, ...), torch.float32, round_to=A.dtype).

    With workers > 1 the row blocks are computed on that many threads (torch releases the GIL in its
    kernels), a few blocks ahead of the caller, and still yielded in order.
    """
    rows, cols = A.shape
    if cols % blocksize:
        raise ValueError(f"rows of {cols} values are not whole blocks of {blocksize}")
    round_to = round_to or A.dtype
    flat = A.reshape(-1)
    absmax = _block_absmax(flat, blocksize)  # once: the codes and the double-quantized scales both need it
    used = dequantize_absmax(quantize_state(absmax, A, blocksize, quant_type, double_quant))

    def block(r0: int) -> tuple[int, int, torch.Tensor]:
        r1 = min(rows, r0 + rows_per_chunk)
        s, e = r0 * cols, r1 * cols
        b0, b1 = s // blocksize, e // blocksize
        vals = _values(flat[s:e].to(torch.float32, copy=True), blocksize, quant_type, absmax[b0:b1])
        vals.view(-1, blocksize).mul_(used[b0:b1].view(-1, 1))
        if round_to != torch.float32:
            vals = vals.to(round_to).float()
        return r0, r1, vals.view(r1 - r0, cols)

    starts = range(0, rows, rows_per_chunk)
    if workers <= 1 or len(starts) < 2:
        yield from map(block, starts)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="qmerge-nf4") as pool:
        pending = deque(pool.submit(block, r0) for r0 in starts[: 2 * workers])
        for r0 in starts[2 * workers :]:
            yield pending.popleft().result()
            pending.append(pool.submit(block, r0))
        while pending:
            yield pending.popleft().result()


def reproduce_4bit(
    A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
) -> torch.Tensor:
    """fp32 values of dequantize_4bit(*quantize_4bit(A, ...), torch.float32, round_to=A.dtype), in A's shape
    (A's size a whole number of blocks)."""
    flat = A.reshape(-1, blocksize if A.numel() % _CHUNK else _CHUNK)
    out = torch.empty(flat.shape, dtype=torch.float32)
    for r0, r1, rows in reproduce_rows(
        flat, blocksize, quant_type, double_quant, max(1, _CHUNK // flat.shape[1]), A.dtype
    ):
        out[r0:r1] = rows
    return out.view(A.shape)
