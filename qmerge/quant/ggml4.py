"""llama.cpp's 4-bit block formats of 32 weights with one fp16 scale: IQ4_NL (a non-linear 16-value
codebook) and Q4_0 (the integers -8..7). Pure tensor code: scales chosen as llama.cpp's quantizer chooses
them with an importance matrix, codes chosen by rounding or handed in (GPTQ), blocks laid out as ggml's
block_iq4_nl / block_q4_0: {d: fp16, qs: uint8[16]}, qs[j] holding weight j in its low nibble and weight
j + 16 in its high nibble.

References: ggml-quants.c (quantize_row_iq4_nl_impl, quantize_row_q4_0_impl, best_index_int8) and gguf-py's
quants.py (IQ4_NL / Q4_0 dequantize_blocks), which the tests decode with.
"""

from __future__ import annotations

import torch

BLOCK = 32
BLOCK_BYTES = 18  # 2 bytes of fp16 scale + 16 bytes of nibbles
VALUES = {
    "iq4_nl": torch.tensor(
        [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
    ),
    "q4_0": torch.arange(-8, 8, dtype=torch.float32),
}
_TRIES = 7  # llama.cpp's ntry for IQ4_NL: scales for the largest weight at values[0] +- 7 steps


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(x, (values[:-1] + values[1:]) / 2)


def block_scales(W: torch.Tensor, importance: torch.Tensor | None, kind: str) -> torch.Tensor:
    """fp32 [out, in / 32], each exactly representable in fp16: for every block the scale d that minimises
    sum(w * (x - d * values[q])^2) over llama.cpp's candidates (d = max / (values[0] + t), t = -7..7, each
    refined by least squares), w the importance of the block's columns (mean squared activation; x^2 without
    one), max the block's weight of largest magnitude. An all-zero block gets 0."""
    values = VALUES[kind]
    out_f, in_f = W.shape
    x = W.float().reshape(out_f, in_f // BLOCK, BLOCK)
    w = x * x if importance is None else importance.float().reshape(1, in_f // BLOCK, BLOCK).expand_as(x)
    at = x.abs().argmax(-1, keepdim=True)
    top = x.gather(-1, at)  # the signed weight of largest magnitude
    best_d = torch.zeros_like(top)
    best = torch.full_like(top, -1.0)
    safe = torch.where(top == 0, torch.ones_like(top), top)
    for t in range(-_TRIES, _TRIES + 1):
        q = values[_nearest(x * ((values[0] + t) / safe), values)]
        sqx, sq2 = (w * q * x).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        d = torch.where(sq2 > 0, sqx / sq2, torch.zeros_like(sqx))
        gain = d * sqx  # the squared error removed by this scale
        better = gain > best
        best_d, best = torch.where(better, d, best_d), torch.where(better, gain, best)
    best_d = torch.where(top == 0, torch.zeros_like(best_d), best_d)
    return best_d.squeeze(-1).half().float()


def round_codes(W: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """Indices [out, in] (uint8) of the nearest codebook value for each weight at its block's scale."""
    values = VALUES[kind]
    s = scale.repeat_interleave(BLOCK, dim=1)
    inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
    return _nearest(W.float() * inv, values).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32 [out, in]: values[code] * the block's scale."""
    return VALUES[kind][codes.long()] * scale.repeat_interleave(BLOCK, dim=1)


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bytes ggml stores (uint8 [out * in / 32 * 18], row-major blocks) for codes [out, in] (indices into
    the sorted codebook, which are IQ4_NL's and Q4_0's stored nibbles) and scales [out, in / 32]."""
    out_f, in_f = codes.shape
    q = codes.reshape(out_f, in_f // BLOCK, 2, BLOCK // 2)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)  # [out, blocks, 16]
    d = scale.half().contiguous().view(torch.uint8).reshape(out_f, in_f // BLOCK, 2)
    return torch.cat([d, qs], dim=-1).reshape(-1)
