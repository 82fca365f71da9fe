"""llama.cpp's 4-bit block formats: IQ4_NL (a non-linear 16-value codebook) and Q4_0 (the integers -8..7),
32 weights with one fp16 scale, and IQ4_XS (IQ4_NL's codebook; 256-weight super-blocks with one fp16 scale
and a 6-bit scale per 32 weights). Pure tensor code: scales chosen as llama.cpp's quantizer chooses them
with an importance matrix, codes chosen by rounding or handed in (GPTQ), blocks laid out as ggml's
block_iq4_nl / block_q4_0 ({d: fp16, qs: uint8[16]}) and block_iq4_xs ({d: fp16, scales_h: uint16,
scales_l: uint8[4], qs: uint8[128]}); in every qs, weight j of a 32-weight block sits in the low nibble of
byte j and weight j + 16 in its high nibble.

References: ggml-quants.c (quantize_row_iq4_nl_impl, quantize_row_q4_0_impl, best_index_int8) and gguf-py's
quants.py (IQ4_NL / Q4_0 / IQ4_XS dequantize_blocks), which the tests decode with.
"""

from __future__ import annotations

import torch

BLOCK = 32
SUPER = 256  # IQ4_XS
BLOCK_BYTES = 18  # 2 bytes of fp16 scale + 16 bytes of nibbles
_IQ4 = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32
)
TYPES = ("IQ4_NL", "IQ4_XS", "Q4_0")  # the GGML types encoded here
VALUES = {"iq4_nl": _IQ4, "iq4_xs": _IQ4, "q4_0": torch.arange(-8, 8, dtype=torch.float32)}
_CHUNK = 1 << 18  # weights per chunk of rows in block_scales
_TRIES = 7  # llama.cpp's ntry for IQ4_NL: scales for the largest weight at values[0] +- 7 steps


def _nearest(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(x, (values[:-1] + values[1:]) / 2)


def block_scales(
    W: torch.Tensor, importance: torch.Tensor | None, kind: str, fp16: bool = True
) -> torch.Tensor:
    """fp32 [out, in / 32], each exactly representable in fp16 (unless fp16=False): for every block the scale d that minimises
    sum(w * (x - d * values[q])^2) over llama.cpp's candidates (d = max / (values[0] + t), t = -7..7, each
    refined by least squares), w the importance of the block's columns (mean squared activation; x^2 without
    one), max the block's weight of largest magnitude. An all-zero block gets 0."""
    out_f, in_f = W.shape
    rows = max(1, _CHUNK // in_f)  # a block of rows at a time: its temporaries stay in cache (1.8x faster)
    imp = None if importance is None else importance.float().reshape(1, in_f // BLOCK, BLOCK)
    scale = torch.cat([_chunk_scales(W[r : r + rows], imp, VALUES[kind]) for r in range(0, out_f, rows)])
    return scale.half().float() if fp16 else scale


def _chunk_scales(W: torch.Tensor, importance: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    x = W.float().reshape(W.shape[0], -1, BLOCK)
    return weighted_scales(x, x * x if importance is None else importance.expand_as(x), values)


def weighted_scales(
    x: torch.Tensor, w: torch.Tensor, values: torch.Tensor, tries: int = _TRIES
) -> torch.Tensor:
    """Each block's scale d [..., 1 dropped] for blocks x [..., B] with weights w [..., B]: the d that
    minimises sum(w * (x - d * values[q])^2) over the candidates d = max / (values[0] + t), t = -tries..tries,
    each refined by least squares (max the block's signed weight of largest magnitude); 0 for a zero block."""
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    best_d, best = torch.zeros_like(top), torch.full_like(top, -1.0)
    safe = torch.where(top == 0, torch.ones_like(top), top)
    lo, hi = float(values[0]), float(values[-1])
    integers = bool((values[1:] - values[:-1] == 1).all())  # Q4_0, Q6_K: round and clamp, no search
    for t in range(-tries, tries + 1):
        y = x * ((values[0] + t) / safe)
        q = torch.round(y).clamp_(lo, hi) if integers else values[_nearest(y, values)]
        wq = w * q
        sqx, sq2 = (wq * x).sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True)
        d = torch.where(sq2 > 0, sqx / sq2, torch.zeros_like(sqx))
        gain = d * sqx  # the squared error removed by this scale
        better = gain > best
        best_d, best = torch.where(better, d, best_d), torch.where(better, gain, best)
    return torch.where(top == 0, torch.zeros_like(best_d), best_d).squeeze(-1)


def superblock_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_XS's two-level scales for per-block scales [out, in / 32]: (d fp32 [out, in / 256], exact in fp16;
    steps int8 [out, in / 32] in -32..31), each block's scale becoming d * steps. As quantize_row_iq4_nl_impl: d maps
    the super-block's largest block scale to -32 steps, each block takes the nearest step (against the stored fp16 d)."""
    s = scale.reshape(scale.shape[0], -1, SUPER // BLOCK)
    top = s.gather(-1, s.abs().argmax(-1, keepdim=True))
    d = (-top / 32).half().float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    steps = torch.round(s * inv).clamp_(-32, 31)
    return d.squeeze(-1), steps.reshape(scale.shape).to(torch.int8)


def effective_scales(d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """fp32 [out, in / 32]: each block's scale d * steps."""
    return d.repeat_interleave(SUPER // BLOCK, dim=1) * steps.float()


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


def encode_superblocks(codes: torch.Tensor, d: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The bytes of block_iq4_xs (uint8 [out * in / 256 * 136]) for codes [out, in], d [out, in / 256] and
    steps [out, in / 32] (superblock_scales): the 6-bit scale steps + 32 split into its low 4 bits (scales_l, two
    blocks a byte, the even block in the low nibble) and its high 2 bits (scales_h, 2 bits a block)."""
    out_f, in_f = codes.shape
    n = in_f // SUPER
    ls = (steps.to(torch.int32) + 32).reshape(out_f, n, SUPER // BLOCK)
    scales_l = ((ls[..., 0::2] & 0xF) | ((ls[..., 1::2] & 0xF) << 4)).to(torch.uint8)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32)
    scales_h = (((ls >> 4) & 3) << shifts).sum(-1)  # [out, n], 16 bits
    sh = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=-1).to(torch.uint8)
    q = codes.reshape(out_f, n, SUPER // BLOCK, 2, BLOCK // 2)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(out_f, n, SUPER // 2)
    dh = d.half().contiguous().view(torch.uint8).reshape(out_f, n, 2)
    return torch.cat([dh, sh, scales_l, qs], dim=-1).reshape(-1)
