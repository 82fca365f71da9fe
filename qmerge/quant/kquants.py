"""llama.cpp's K-quant super-blocks Q4_K, Q5_K and Q6_K (256 weights), the types of q4_k_m, q4_k_s, q5_k_m,
q5_k_s and q6_k files.

Q4_K: eight 32-weight blocks, each weight d * sc * q - dmin * m with q in 0..15, sc and m 6-bit per block,
d and dmin fp16 per super-block (block_q4_K: {d, dmin: fp16, scales: uint8[12], qs: uint8[128]}). Q5_K: the
same with q in 0..31, its fifth bits in qh (block_q5_K: {d, dmin, scales[12], qh: uint8[32], qs[128]}).
Q6_K: sixteen 16-weight blocks, each weight d * sc * q with q in -32..31, sc int8 per block, d fp16 per
super-block (block_q6_K: {ql: uint8[128], qh: uint8[64], scales: int8[16], d: fp16}).

Pure tensor code, in three steps as ggml-quants.c's quantize_row_q4_K_impl / quantize_row_q6_K_impl take
them: each block's scale (and minimum) chosen by an importance-weighted search, then the per-block scales
quantized to 6 or 8 bits against the super-block's fp16 scale, then the codes, by rounding or handed in
(GPTQ, gptq.py: `Grid` is what gptq_codes chooses codes against). gguf-py's quants.py (Q4_K / Q5_K /
Q6_K dequantize_blocks) is the reference the tests decode with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .ggml4 import _nearest, weighted_scales

SUPER = 256
_Q4K = torch.arange(16, dtype=torch.float32)
_Q5K = torch.arange(32, dtype=torch.float32)
_Q6K = torch.arange(-32, 32, dtype=torch.float32)
# quantize_row_q4_K_impl's make_qkx3_quants(..., rmin -0.9, rdelta 0.05, nstep 36)
_RMIN, _RDELTA, _NSTEP = -0.9, 0.05, 36
_CHUNK = 1 << 18  # weights per chunk of rows in the scale search (its temporaries stay in cache)


@dataclasses.dataclass
class Grid:
    """What one tensor's codes are chosen against: weight = values[code] * scale + offset of its block
    (scale, offset fp32 [out, in / block], exactly what llama.cpp's dequantizer computes), and `encode`,
    codes [out, in] -> the tensor's bytes (uint8, row-major super-blocks)."""

    values: torch.Tensor
    block: int
    scale: torch.Tensor
    offset: torch.Tensor | None
    encode: Callable[[torch.Tensor], torch.Tensor]

    def round(self, W: torch.Tensor) -> torch.Tensor:
        """The nearest code of each weight (uint8 [out, in])."""
        s, off = self._expand(self.scale), self._expand(self.offset)
        inv = torch.where(s != 0, 1.0 / s, torch.zeros_like(s))
        return _nearest((W.float() - off) * inv, self.values).to(torch.uint8)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.values[codes.long()] * self._expand(self.scale) + self._expand(self.offset)

    def _expand(self, t: torch.Tensor | None):
        return 0.0 if t is None else t.repeat_interleave(self.block, dim=1)


def _weights(
    W: torch.Tensor, importance: torch.Tensor | None, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as [out, in / 256, 256 / block, block], the search weights of each weight): with an importance
    matrix imp * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) of the super-block, as ggml-quants.c; without
    one sqrt(sigma2 / 2) + |x| (Q4_K) or x^2 (Q6_K)."""
    out_f, in_f = W.shape
    x = W.float().reshape(out_f, in_f // SUPER, SUPER // block, block)
    sigma2 = 2 * x.square().mean(dim=(-2, -1), keepdim=True)
    if importance is not None:
        imp = importance.float().reshape(1, in_f // SUPER, SUPER // block, block)
        return x, imp * torch.sqrt(sigma2 + x * x)
    return x, (torch.sqrt(sigma2 / 2) + x.abs() if block == 32 else x * x)


def _affine(x: torch.Tensor, w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale >= 0, minimum <= 0) of each block x [out, n, 8, 32] for weights scale * q + minimum, q in
    0..top: the pair of least weighted squared error over make_qkx3_quants' candidate steps, each refit by
    weighted least squares (the minimum held at 0 where the fit would make it positive). A chunk of rows at a
    time, so that the temporaries stay in cache."""
    rows = max(1, _CHUNK // (x[0].numel()))
    parts = [_affine_chunk(x[r : r + rows], w[r : r + rows], top) for r in range(0, len(x), rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _affine_chunk(x: torch.Tensor, w: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    def total(t):
        return t.sum(-1, keepdim=True)

    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = x.amax(-1, keepdim=True) - lo
    inv = 1 / torch.where(span > 0, span, torch.ones_like(span))
    sw, wx = total(w), w * x
    sx, sxx = total(wx), total(wx * x)
    shifted = x - lo
    best_s, best_m, best = span / top, lo, torch.full_like(lo, float("inf"))
    for step in range(-1, _NSTEP + 1):  # -1: the plain grid over [min, max]
        q = torch.round(shifted * (inv * (top if step < 0 else _RMIN + _RDELTA * step + top))).clamp_(0, top)
        wq = w * q
        sl, sl2, sxl = total(wq), total(wq * q), total(wx * q)
        if step < 0:
            s, m = best_s, best_m
        else:
            det = sw * sl2 - sl * sl
            safe = torch.where(det > 0, det, torch.ones_like(det))
            s, m = (sw * sxl - sx * sl) / safe, (sl2 * sx - sl * sxl) / safe
            pos = (m > 0) | (det <= 0)
            m = torch.where(pos, torch.zeros_like(m), m)
            s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s).clamp_(min=0)
        # sum w (s q + m - x)^2 from the block sums
        err = s * s * sl2 + 2 * s * m * sl + m * m * sw - 2 * s * sxl - 2 * m * sx + sxx
        better = err < best
        best_s, best_m, best = (
            torch.where(better, s, best_s),
            torch.where(better, m, best_m),
            torch.where(better, err, best),
        )
    return best_s.squeeze(-1), best_m.squeeze(-1)


def _six_bits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16-exact super-block scale [out, n], 6-bit levels [out, n, 8]) of non-negative block values
    [out, n, 8], as quantize_row_q4_K_ref: the largest maps to 63."""
    top = v.amax(-1, keepdim=True)
    levels = torch.round(v * torch.where(top > 0, 63 / top, torch.zeros_like(top))).clamp_(0, 63)
    return (top / 63).half().float().squeeze(-1), levels.to(torch.uint8)


def q4_k(W: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
    """The Q4_K grid of W [out, in] (in a multiple of 256), importance [in] the mean squared activation of
    each input column (None: llama.cpp's rule without an importance matrix)."""
    return _affine_grid(W, importance, 4)


def q5_k(W: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
    """The Q5_K grid of W [out, in] (in a multiple of 256): Q4_K's with 5-bit codes."""
    return _affine_grid(W, importance, 5)


def _affine_grid(W: torch.Tensor, importance: torch.Tensor | None, bits: int) -> Grid:
    out_f, in_f = W.shape
    values = _Q4K if bits == 4 else _Q5K
    scale, minimum = _affine(*_weights(W, importance, 32), len(values) - 1)  # [out, n, 8]
    d, sc = _six_bits(scale)
    dmin, m = _six_bits(-minimum)
    eff = (d.unsqueeze(-1) * sc.float()).reshape(out_f, -1)
    off = -(dmin.unsqueeze(-1) * m.float()).reshape(out_f, -1)

    def encode(codes: torch.Tensor) -> torch.Tensor:
        n = in_f // SUPER
        packed = torch.cat(
            [
                (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
            ],
            dim=-1,
        )
        q = codes.reshape(out_f, n, 4, 2, 32)
        qs = ((q[..., 0, :] & 15) | ((q[..., 1, :] & 15) << 4)).reshape(out_f, n, 128)
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), packed]
        if bits == 5:  # bit j of qh[i]: the fifth bit of weight i of block j
            high = (codes.reshape(out_f, n, 8, 32) >> 4).to(torch.int32) << torch.arange(8).view(1, 1, 8, 1)
            parts.append(high.sum(2).to(torch.uint8))
        return torch.cat(parts + [qs], dim=-1).reshape(-1)

    return Grid(values, 32, eff, off, encode)


def q6_k(W: torch.Tensor, importance: torch.Tensor | None = None) -> Grid:
    """The Q6_K grid of W [out, in] (in a multiple of 256): each 16-weight block's scale by the weighted
    search, then int8 levels against d = -max / 128 (max the signed block scale of largest magnitude)."""
    out_f, in_f = W.shape
    x, w = _weights(W, importance, 16)
    rows = max(1, _CHUNK // in_f)
    scale = torch.cat(
        [weighted_scales(x[r : r + rows], w[r : r + rows], _Q6K, 9) for r in range(0, out_f, rows)]
    )
    top = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))
    inv = torch.where(
        top != 0, -128 / torch.where(top != 0, top, torch.ones_like(top)), torch.zeros_like(top)
    )
    levels = torch.round(inv * scale).clamp_(max=127).to(torch.int8)
    d = torch.where(inv != 0, 1 / torch.where(inv != 0, inv, torch.ones_like(inv)), torch.zeros_like(inv))
    d = d.half().float().squeeze(-1)
    eff = (d.unsqueeze(-1) * levels.float()).reshape(out_f, -1)

    def encode(codes: torch.Tensor) -> torch.Tensor:  # codes 0..63 are q + 32
        n = in_f // SUPER
        c = codes.reshape(out_f, n, 2, 128)
        lo, hi = c & 15, c >> 4
        ql = (lo[..., :64] | (lo[..., 64:] << 4)).reshape(out_f, n, 128)
        qh = hi[..., :32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:] << 6)
        scales = levels.view(torch.uint8)
        return torch.cat([ql, qh.reshape(out_f, n, 64), scales, _fp16_bytes(d)], dim=-1).reshape(-1)

    return Grid(_Q6K, 16, eff, None, encode)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[out, n] -> uint8 [out, n, 2], little-endian fp16."""
    return v.half().contiguous().view(torch.uint8).reshape(*v.shape, 2)


GRIDS = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
