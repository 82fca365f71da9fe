"""A tensor's GGUF bytes in parts (formats/gguf.py writes them one after another): the same bytes as
gguf-py encoding the whole tensor, quantized a block of rows at a time, with rows a table lacks as copies of
its first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmerge.io.gguf import encoding


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
def test_parts_are_the_whole_tensors_bytes(monkeypatch, kind):
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    monkeypatch.setattr(encoding, "_PART", 3 * 64 * 4)  # three rows a block: 7 blocks, the last short
    t = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    parts = encoding.encode_parts(t, qtype)
    assert len(parts) == (7 if kind == "Q8_0" else 1)
    whole = (
        gguf.quants.quantize(t.numpy(), qtype).reshape(-1).view(np.uint8)
        if kind == "Q8_0"
        else encoding.encode(t, qtype)
    )
    assert np.array_equal(np.concatenate(parts), whole)
    padded = np.concatenate(encoding.encode_parts(t, qtype, rows=23))
    row = len(whole) // 20
    assert len(padded) == 23 * row and np.array_equal(padded[: len(whole)], whole)
    assert all(np.array_equal(padded[i * row : (i + 1) * row], whole[:row]) for i in range(20, 23))


def test_stacked_experts_quantize_in_blocks_too(monkeypatch):
    import gguf

    monkeypatch.setattr(encoding, "_PART", 2 * 32 * 64 * 4)  # two experts a block
    t = torch.randn(5, 32, 64, generator=torch.Generator().manual_seed(1))
    parts = encoding.encode_parts(t, gguf.GGMLQuantizationType.Q8_0)
    assert len(parts) == 3
    whole = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1).view(np.uint8)
    assert np.array_equal(np.concatenate(parts), whole)
