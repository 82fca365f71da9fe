"""4-bit codes chosen with error feedback (GPTQ, Frantar et al. 2022): any sorted 16-value codebook with
static per-block scales (gptq_codes; llama.cpp's IQ4_NL/Q4_0 in ggml4.py), and NF4/FP4 in bitsandbytes'
storage format (gptq_4bit).

Plain rounding gives each weight the nearest code on its own. GPTQ rounds the columns (input features) in
order and spreads each column's rounding error over the columns not yet rounded, weighted by the inverse
Hessian of the layer's inputs on calibration data, so that X @ Q.T stays close to X @ W.T. The block scales
are fixed first ("static groups"): absmax per block of the weight, double-quantized exactly as bitsandbytes
stores it, so the codes are chosen against the scales a loader will use. Pure tensor code.
"""

from __future__ import annotations

import torch

from .blockwise import QuantState, _sorted_code, dequantize_absmax, quantize_state
from .reproduce import _block_absmax, _value_table


def layer_hessian(x: torch.Tensor) -> torch.Tensor:
    """X^T X / n for a layer's inputs x [..., in] (the GPTQ Hessian, up to the factor 2), in fp32 (as GPTQ
    implementations accumulate it; 7B-shape down_proj over 8192 tokens: 2x faster than fp64, 3e-7 apart)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x / max(1, x.shape[0])


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, with `damp` x mean(diag(H)) added to the diagonal (GPTQ's percdamp)."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += torch.eye(len(H)) * (damp * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


class Hessian:
    """H = X^T X / n of a layer's inputs and, made once, the factor of its damped inverse: layers that read
    the same input (q/k/v, gate/up) share one."""

    def __init__(self, H: torch.Tensor):
        self.H = H
        self._inverse: tuple[float, torch.Tensor] | None = None

    @classmethod
    def of_inputs(cls, x: torch.Tensor) -> Hessian:
        return cls(layer_hessian(x))

    def inverse(self, damp: float) -> torch.Tensor:
        if self._inverse is None or self._inverse[0] != damp:
            self._inverse = (damp, _inverse_cholesky(self.H, damp))
        return self._inverse[1]


def gptq_codes(
    W: torch.Tensor,
    H: torch.Tensor | Hessian,
    values: torch.Tensor,
    scale: torch.Tensor,
    blocksize: int,
    damp: float = 0.01,
    columns: int = 128,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices [out, in] (uint8) into the sorted codebook `values` (fp32[k]) for W [out, in], each weight
    standing for values[i] * scale + offset of its block (`scale`, `offset` fp32 [out, in / blocksize], fixed
    beforehand; offset 0 without one, llama.cpp's K-quant minimums with one), chosen column by column with
    error feedback against H [in, in].

    Works on W transposed, so that each input column is a contiguous row; fp32, as GPTQ implementations do.
    A block whose scale is 0 gets the code nearest 0.
    """
    out_f, in_f = W.shape
    scale = scale.float().T.contiguous()  # [in / blocksize, out]
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    offset = torch.zeros_like(scale) if offset is None else offset.float().T.contiguous()
    values = values.float()
    midpoints = (values[:-1] + values[1:]) / 2
    Hinv = (H if isinstance(H, Hessian) else Hessian(H)).inverse(damp)
    wt = W.float().T.contiguous()  # [in, out]
    idx = torch.empty(in_f, out_f, dtype=torch.uint8)
    for c0 in range(0, in_f, columns):
        c1 = min(c0 + columns, in_f)
        block, err = wt[c0:c1].clone(), torch.empty(c1 - c0, out_f)
        for i in range(c1 - c0):
            g = (c0 + i) // blocksize
            k = torch.bucketize((block[i] - offset[g]) * inv[g], midpoints)  # nearest, ties to the lower
            idx[c0 + i] = k.to(torch.uint8)
            e = (block[i] - values[k] * scale[g] - offset[g]) / Hinv[c0 + i, c0 + i]
            block[i:].addr_(Hinv[c0 + i, c0 + i : c1], e, alpha=-1)  # rank-1, in place
            err[i] = e
        wt[c1:].addmm_(Hinv[c0:c1, c1:].T, err, alpha=-1)
    return idx.T.contiguous()


def gptq_4bit(
    W: torch.Tensor,
    H: torch.Tensor | Hessian,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    damp: float = 0.01,
    columns: int = 128,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize W [out, in] (rows whole blocks) to NF4/FP4 codes with error feedback against H [in, in].

    Returns (packed uint8[(n+1)//2, 1], QuantState) in bitsandbytes' layout (quantize_4bit's), dtype W.dtype.
    The scales are bitsandbytes' absmax per block, double-quantized as it stores them.
    """
    out_f, in_f = W.shape
    if in_f % blocksize:
        raise ValueError(f"rows of {in_f} values are not whole blocks of {blocksize}")
    absmax = _block_absmax(W.reshape(-1), blocksize)
    state = quantize_state(absmax, W, blocksize, quant_type, double_quant)
    scale = dequantize_absmax(state).view(out_f, in_f // blocksize)
    idx = gptq_codes(W, H, _value_table(quant_type), scale, blocksize, damp, columns)
    _, order = _sorted_code(quant_type)
    codes = order.to(torch.uint8)[idx.reshape(-1).long()]  # FP4: sorted index -> its bit pattern
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return ((codes[::2] << 4) | codes[1::2]).unsqueeze(1), state
