"""Blockwise 4-bit (NF4/FP4) and 8-bit dynamic quantization, bit-exact with bitsandbytes 0.50 on CPU.

Pure tensor code: no file I/O, no bitsandbytes import. The reference implementations it matches are
bitsandbytes' default backend (`backends/default/ops.py`: quantize_4bit, dequantize_4bit) and its CPU
kernels (`csrc/cpu_ops.cpp`: quantize_cpu for the 8-bit map used by double quantization).

This module is long because quantize and dequantize, each bit-exact with bitsandbytes, belong side by side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from math import prod

import torch

from .codebooks import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, code_4bit, dynamic_map

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantState:
    """What bitsandbytes keeps beside a packed 4-bit weight (its QuantState, flattened).

    absmax is fp32[blocks] without double quant, uint8[blocks] with it (then nested_* are set).
    """

    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None  # fp32 scalar: mean of absmax, subtracted before double quant
    nested_absmax: torch.Tensor | None = None  # fp32[ceil(blocks / 256)]
    nested_code: torch.Tensor | None = None  # fp32[256], the signed dynamic map
    nested_blocksize: int = NESTED_BLOCKSIZE
    nested_dtype: torch.dtype = torch.float32  # bfloat16 in checkpoints saved after a CPU forward (bnb 0.50)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")


def _sorted_code(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted code values and the sort order (identity for NF4, a remap for FP4)."""
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


@lru_cache(maxsize=2)
def _bucket_lut(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables that replace bucketize for values in [-1, 1], indexed by the fp32's high 16 bits (+32768).

    (uint8[65536]: how many midpoints lie below every float whose high half is that index; fp32[65536]: the
    midpoint inside that range of floats, +inf where none is: 15 of the 65536 ranges hold one). A value y
    in range i is count[i] + (y > midpoint[i]): bucketize with ties to the lower code, without a branch.
    """
    midpoints, _ = _sorted_code(quant_type)
    bits = (torch.arange(65536, dtype=torch.int64) - 32768) << 16
    lo = bits.to(torch.int32).view(torch.float32)
    hi = (bits | 0xFFFF).to(torch.int32).view(torch.float32)
    a, b = torch.minimum(lo, hi), torch.maximum(lo, hi)
    count_a = torch.searchsorted(midpoints, a, side="left")
    count_b = torch.searchsorted(midpoints, b, side="left")
    inside = (count_a != count_b) & ~torch.isnan(a)
    midpoint = torch.where(inside, midpoints[count_a.clamp(max=len(midpoints) - 1)], float("inf"))
    return count_a.to(torch.uint8), midpoint


def _bucket_index(y: torch.Tensor) -> torch.Tensor:
    """int32 index into _bucket_lut's tables of each value of fp32 y: its high 16 bits, + 32768."""
    return y.view(torch.int32).bitwise_right_shift(16).add_(32768)


_CHUNK = 1 << 18  # elements per pass: keeps the intermediates in cache (a multiple of every blocksize)


def _codes_full_blocks(
    flat: torch.Tensor, blocksize: int, quant_type: str, codes: torch.Tensor, absmax: torch.Tensor
) -> None:
    """Sorted-code indices and absmax of whole blocks, written into codes/absmax, chunk by chunk.

    Same result as bucketize(clamp(x * (1 / absmax), -1, 1), midpoints) (ties to the lower code), by
    _bucket_lut's two tables.
    """
    count, midpoint = _bucket_lut(quant_type)
    for s in range(0, flat.numel(), _CHUNK):
        x = flat[s : s + _CHUNK].to(torch.float32, copy=True).view(-1, blocksize)  # scaled in place below
        am = x.abs().amax(dim=-1)
        absmax[s // blocksize : s // blocksize + am.numel()] = am
        y = x.mul_((1.0 / am.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
        index = _bucket_index(y)
        c = torch.index_select(count, 0, index)
        codes[s : s + y.numel()] = c.add_(y > torch.index_select(midpoint, 0, index))


def quantize_4bit_codes(
    A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize A blockwise to 4-bit codes: returns (packed uint8[(n+1)//2, 1], absmax fp32[blocks]).

    Same arithmetic as bitsandbytes' default quantize_4bit: fp32 input, scale by the reciprocal of the
    block absmax (true division for a last partial block), clamp to [-1, 1], round to the nearest code
    with ties to the lower one (bucketize on midpoints), element 2i in the HIGH nibble.
    """
    _check_blocksize(blocksize)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if A.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32/float16/bfloat16, got {A.dtype}")
    flat = A.reshape(-1)
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    codes = torch.empty(n + n % 2, dtype=torch.uint8)
    absmax = torch.empty(-(n // -blocksize), dtype=torch.float32)
    midpoints, order = _sorted_code(quant_type)
    _codes_full_blocks(flat[:full], blocksize, quant_type, codes, absmax)
    if rem:
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)  # stored clamped, unlike whole blocks (as bitsandbytes)
        absmax[-1] = am
        scaled = torch.clamp(tail / am, -1, 1)
        codes[full:n] = torch.bucketize(scaled, midpoints).to(torch.uint8)
    if n % 2:  # bitsandbytes pads the scaled values with one 0.0 before packing
        codes[n] = torch.bucketize(torch.zeros(1), midpoints).to(torch.uint8)
    if quant_type != "nf4":
        codes = order.to(torch.uint8)[codes.long()]
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    return packed, absmax


_LUT_SIZE = 65536


@lru_cache(maxsize=4)
def _lut_8bit(code_key: tuple[float, ...]) -> torch.Tensor:
    """int64[65536]: nearest code index for each of 65536 evenly spaced values in [-1, 1].

    Same table as bitsandbytes' build_quantize_lut (csrc/cpu_ops.cpp): bin i stands for
    -1 + 2i/65535 in fp32 and takes the first code whose upper midpoint is not below it.
    """
    code = torch.tensor(code_key, dtype=torch.float32)
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, val, side="left")


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-entry code: (uint8 codes, fp32 absmax[blocks]).

    Same as bitsandbytes 0.50's CPU quantize_cpu: multiply by the fp32 reciprocal of the block absmax,
    clamp to [-1, 1], map to one of 65536 bins with (v + 1) * 0.5 * 65535 + 0.5 (the last multiply-add
    fused, as GCC contracts it under target("avx2,fma")), then read the bin's code from a lookup table.
    An all-zero block gets absmax 0 and codes 0.
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    nblocks = -(n // -blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=-1)  # zero padding cannot raise |max|
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = torch.clamp(blocks * inv.view(-1, 1), -1, 1)
    half = (v + 1.0) * 0.5
    # fma(half, 65535, 0.5): the exact product fits in fp64, so one rounding to fp32 reproduces it.
    bins = (half.double() * float(_LUT_SIZE - 1) + 0.5).float().to(torch.int64)
    lut = _lut_8bit(tuple(code.float().tolist()))
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(bins), lut[bins])
    q = q.reshape(-1)[:n].to(torch.uint8)
    return q.reshape(A.shape), absmax


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Inverse of quantize_blockwise_8bit: fp32 values code[q] * absmax[block], shape of q."""
    flat = code.float()[q.reshape(-1).long()]
    n = flat.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (flat * scale).reshape(q.shape)


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize A as bitsandbytes.functional.quantize_4bit(A, blocksize, compress_statistics, quant_type).

    Returns the packed uint8[(n+1)//2, 1] codes and their QuantState (dtype = A.dtype).
    """
    packed, absmax = quantize_4bit_codes(A, blocksize, quant_type)
    return packed, quantize_state(absmax, A, blocksize, quant_type, double_quant)


def quantize_state(
    absmax: torch.Tensor, A: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
) -> QuantState:
    """The QuantState quantize_4bit stores for A's fp32 block absmax (double-quantized when asked)."""
    common = dict(shape=tuple(A.shape), dtype=A.dtype, blocksize=blocksize, quant_type=quant_type)
    if not double_quant:
        return QuantState(absmax=absmax, code=code_4bit(quant_type), **common)
    offset = absmax.mean()
    nested_code = dynamic_map()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    # The saved map keeps code[0] = -0.9929...; only the search inside quantize_cpu uses -1.0.
    return QuantState(
        absmax=qabsmax,
        code=code_4bit(quant_type),
        offset=offset,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        **common,
    )


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The per-block fp32 scales of a QuantState, undoing double quantization when present."""
    if not state.double_quant:
        return state.absmax.float()
    absmax = dequantize_blockwise_8bit(
        state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize
    )
    if state.nested_dtype != torch.float32:
        # bitsandbytes dequantizes into the nested dtype and adds the offset in place; PyTorch first casts
        # the 0-dim fp32 offset to that dtype, adds in fp32, rounds back; then the result is widened.
        absmax = absmax.to(state.nested_dtype)
        offset = state.offset.to(state.nested_dtype).float()
        return (absmax.float() + offset).to(state.nested_dtype).float()
    return absmax + state.offset.float()


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """fp32[256, 2]: the two code values held by each byte (high nibble first)."""
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


@dataclass(frozen=True)
class _Prepared:
    """A 4-bit tensor ready for range dequantization: packed bytes, fp32 block scales, byte table."""

    flat: torch.Tensor
    absmax: torch.Tensor
    table: torch.Tensor  # int64[256]: the two fp32 code values of each byte, high nibble first
    blocksize: int
    n: int


def _prepare(packed: torch.Tensor, state: QuantState) -> _Prepared:
    n = state.numel
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    nbytes = (n + 1) // 2
    if packed.numel() < nbytes:
        raise ValueError(
            f"packed 4-bit data holds {packed.numel()} bytes, shape {state.shape} needs {nbytes}"
        )
    absmax = dequantize_absmax(state)
    blocks = -(n // -state.blocksize)
    if absmax.numel() < blocks:
        raise ValueError(f"absmax has {absmax.numel()} blocks, shape {state.shape} needs {blocks}")
    code = state.code.float()
    if state.quant_type == "fp4":
        # bitsandbytes' CUDA kernel (dDequantizeFP4Tree, training's) decodes FP4 code 0b1000 as -0.0 (sign
        # bit, zero magnitude); the saved quant_map holds +0.0 there, and its CPU kernel (0.50.2, on an
        # AVX-512 machine) gives +0.0. qmerge keeps training's -0.0.
        code = code.clone()
        code[8] = -0.0
    # Each byte's two fp32 values packed into one int64: a 1-D gather, 1.5x faster than gathering rows.
    table = _byte_table(code).contiguous().view(torch.int64).view(-1)
    return _Prepared(packed.reshape(-1)[:nbytes], absmax, table, state.blocksize, n)


def _dequant_range(p: _Prepared, start: int, end: int) -> torch.Tensor:
    """fp32 code * absmax for elements [start, end); start is a multiple of the blocksize (so even)."""
    bs = p.blocksize
    vals = torch.index_select(p.table, 0, p.flat[start // 2 : (end + 1) // 2].int()).view(torch.float32)[
        : end - start
    ]
    whole = (end - start) // bs * bs
    vals[:whole].view(-1, bs).mul_(p.absmax[start // bs : start // bs + whole // bs].view(-1, 1))
    if whole < end - start:  # a last partial block
        vals[whole:].mul_(p.absmax[(start + whole) // bs])
    return vals


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    dtype: torch.dtype | None = None,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize packed 4-bit codes to a tensor of state.shape.

    Each value is code[nibble] * absmax[block] computed in fp32 and cast once to `dtype` (default
    state.dtype), exactly as bitsandbytes.functional.dequantize_4bit. Pass dtype=torch.float32 for the
    unrounded fp32 product; dtype=torch.float32 with round_to=state.dtype gives bitsandbytes' values
    widened back to fp32 (what a QLoRA forward computes with) in a single pass.
    """
    p = _prepare(packed, state)
    dtype = dtype or state.dtype
    out = torch.empty(p.n, dtype=dtype)
    step = max(_CHUNK // p.blocksize, 1) * p.blocksize
    for s in range(0, p.n, step):
        e = min(s + step, p.n)
        vals = _dequant_range(p, s, e)
        out[s:e] = vals.to(round_to) if round_to is not None and round_to != dtype else vals
    return out.view(state.shape)


def dequantize_rows(
    packed: torch.Tensor, state: QuantState, rows_per_chunk: int, round_to: torch.dtype | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (row_start, row_stop, fp32 rows) of a 2-D 4-bit weight whose rows are whole blocks.

    Same values as dequantize_4bit(packed, state, torch.float32, round_to), a few rows at a time, so a
    caller can finish each piece (add a LoRA delta, cast) while it is still in cache.
    """
    rows, cols = state.shape
    if cols % state.blocksize:
        raise ValueError(f"rows of {cols} values are not whole blocks of {state.blocksize}")
    p = _prepare(packed, state)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        vals = _dequant_range(p, r0 * cols, r1 * cols)
        if round_to is not None and round_to != torch.float32:
            vals = vals.to(round_to).float()
        yield r0, r1, vals.view(r1 - r0, cols)


def bits_per_param(state: QuantState) -> float:
    """Effective storage bits per parameter: 4 for the codes plus the scale overhead."""
    n = state.numel
    bits = 8 * ((n + 1) // 2)
    bits += state.absmax.numel() * state.absmax.element_size() * 8
    if state.double_quant:
        bits += state.nested_absmax.numel() * 32 + 32  # nested scales + the offset
    return bits / n
