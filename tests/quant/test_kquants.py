"""llama.cpp's Q4_K, Q5_K and Q6_K super-blocks as qmerge encodes them: decoded by gguf-py's dequantizer (the
reference) to exactly qmerge's values; block scales about as good as llama.cpp's own quantizer's (called in
process through ggml_quantize_chunk), with and without an importance matrix; GPTQ codes against the fixed
scales and minimums: rounding under an identity Hessian, less output error than rounding otherwise."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from qmerge.quant import kquants
from qmerge.quant.gptq import gptq_codes, layer_hessian

T = gguf.GGMLQuantizationType
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _weights(seed=0, rows=48, cols=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02 + 0.002
    W[3, :256] = 0  # an all-zero super-block
    W[4, 256:] = -W[4, 256:].abs()  # all negative: Q4_K's minimum does the work
    W[5, 40] = 0.5  # an outlier
    return W


def _importance(cols=512, seed=1):
    return torch.rand(cols, generator=torch.Generator().manual_seed(seed)) ** 4 * 10 + 0.01


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_decode_in_gguf_py_to_our_values(qtype, weighted):
    W = _weights()
    grid = kquants.GRIDS[qtype](W, _importance() if weighted else None)
    codes = grid.round(W)
    blocks = grid.encode(codes).numpy()
    assert blocks.size == W.numel() // 256 * BYTES[qtype]
    theirs = dequantize(blocks.reshape(W.shape[0], -1), T[qtype])
    assert np.array_equal(theirs, grid.dequantize(codes).numpy())
    assert np.all(theirs[3, :256] == 0)
    assert float(((theirs - W.numpy()) ** 2).mean()) < 0.01 * float((W**2).mean())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("weighted", [False, True])
def test_scales_about_as_good_as_llama_cpp(qtype, weighted):
    """Plain rounding on qmerge's grid against llama.cpp's own quantizer (quantize_row_q4_K/q6_K, with the
    same importance matrix), in the importance-weighted squared error llama.cpp minimises: measured 1.01x /
    1.04x (Q4_K without / with importance), 0.99x / 1.05x (Q5_K), 1.00x / 0.78x (Q6_K)."""
    from qmerge import llama_cpp

    W = _weights(2, rows=128, cols=1024) * 1.3
    imp = _importance(1024) if weighted else None
    grid = kquants.GRIDS[qtype](W, imp)
    ours = grid.dequantize(grid.round(W))
    blocks = llama_cpp.quantize_rows(int(T[qtype]), W.numpy(), None if imp is None else imp.numpy())
    theirs = torch.from_numpy(dequantize(blocks.reshape(W.shape[0], -1), T[qtype]))
    w = torch.ones(1024) if imp is None else imp
    err = lambda Q: float((((Q - W) ** 2) * w).sum())  # noqa: E731
    assert err(ours) < 1.06 * err(theirs)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_gptq_codes_on_kquant_grids(qtype):
    """Q4_K's minimums are gptq_codes' offsets: an identity Hessian gives rounding exactly; correlated inputs
    less output error than rounding against the same scales."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 256, generator=g) * 0.02 + 0.004
    grid = kquants.GRIDS[qtype](W)
    codes = gptq_codes(W, torch.eye(256), grid.values, grid.scale, grid.block, offset=grid.offset)
    assert torch.equal(codes, grid.round(W))
    X = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    H = layer_hessian(X)
    grid = kquants.GRIDS[qtype](W, torch.diag(H))
    codes = gptq_codes(W, H, grid.values, grid.scale, grid.block, offset=grid.offset)

    def out_err(c):
        return float(((X @ (grid.dequantize(c) - W).T) ** 2).mean())

    assert out_err(codes) < 0.7 * out_err(grid.round(W))
