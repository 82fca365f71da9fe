"""llama.cpp's IQ4_NL and Q4_0 blocks as qmerge encodes them: decoded by gguf-py's dequantizer (the reference)
to exactly qmerge's values; scales at least as good as llama.cpp's Q4_0 rule; GPTQ codes beat rounding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from qmerge.quant import ggml4
from qmerge.quant.gptq import gptq_codes, layer_hessian

TYPES = {
    "iq4_nl": gguf.GGMLQuantizationType.IQ4_NL,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "iq4_xs": gguf.GGMLQuantizationType.IQ4_XS,
}


def _weights(seed=0, rows=48, cols=256):
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    W[3, :32] = 0  # an all-zero block
    W[5, 40] = 0.5  # an outlier
    return W


@pytest.mark.parametrize("kind", ["iq4_nl", "q4_0"])
def test_blocks_decode_in_gguf_py_to_our_values(kind):
    W = _weights()
    scale = ggml4.block_scales(W, None, kind)
    codes = ggml4.round_codes(W, scale, kind)
    blocks = ggml4.encode_blocks(codes, scale).numpy()
    assert blocks.size == W.numel() // 32 * 18
    theirs = dequantize(blocks.reshape(W.shape[0], -1), TYPES[kind])
    assert np.array_equal(theirs, ggml4.dequantize(codes, scale, kind).numpy())
    assert np.all(theirs[3, :32] == 0)


def test_superblocks_decode_in_gguf_py_to_our_values():
    """IQ4_XS: 6-bit block scales under one fp16 scale per 256 weights, split into scales_l / scales_h."""
    W = _weights(3, cols=512)
    W[7, 256:] = 0  # an all-zero super-block
    d, steps = ggml4.superblock_scales(ggml4.block_scales(W, None, "iq4_xs", fp16=False))
    assert steps.min() >= -32 and steps.max() <= 31 and (steps == -32).any()
    scale = ggml4.effective_scales(d, steps)
    codes = ggml4.round_codes(W, scale, "iq4_xs")
    blocks = ggml4.encode_superblocks(codes, d, steps).numpy()
    assert blocks.size == W.numel() // 256 * 136
    theirs = dequantize(blocks.reshape(W.shape[0], -1), TYPES["iq4_xs"])
    assert np.array_equal(theirs, ggml4.dequantize(codes, scale, "iq4_xs").numpy())
    assert np.all(theirs[7, 256:] == 0)


def test_scales_no_worse_than_llama_cpp_q4_0():
    """gguf-py's Q4_0 quantizer is llama.cpp's reference rule (d = max / -8, round): ours searches around it
    and refines by least squares."""
    W = _weights(1)
    scale = ggml4.block_scales(W, None, "q4_0")
    ours = ggml4.dequantize(ggml4.round_codes(W, scale, "q4_0"), scale, "q4_0").numpy()
    theirs = dequantize(quantize(W.numpy(), TYPES["q4_0"]), TYPES["q4_0"])
    err = lambda q: float(((q - W.numpy()) ** 2).sum())  # noqa: E731
    assert err(ours) < err(theirs)


@pytest.mark.parametrize("kind", ["iq4_nl", "q4_0"])
def test_gptq_codes(kind):
    """An identity Hessian: rounding exactly. Correlated inputs: less output error than rounding."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 256, generator=g) * 0.02
    scale = ggml4.block_scales(W, None, kind)
    rounded = ggml4.round_codes(W, scale, kind)
    assert torch.equal(gptq_codes(W, torch.eye(256), ggml4.VALUES[kind], scale, 32), rounded)
    X = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    H = layer_hessian(X)
    scale = ggml4.block_scales(W, torch.diag(H), kind)
    codes = gptq_codes(W, H, ggml4.VALUES[kind], scale, 32)
    rounded = ggml4.round_codes(W, scale, kind)

    def out_err(c):
        return float(((X @ (ggml4.dequantize(c, scale, kind) - W).T) ** 2).mean())

    assert out_err(codes) < 0.7 * out_err(rounded)
