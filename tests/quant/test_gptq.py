"""GPTQ with bitsandbytes' static block scales: plain rounding where there is nothing to feed back (an
identity Hessian), less output error than plain rounding where there is."""

from __future__ import annotations

import pytest
import torch

from qmerge.quant.blockwise import dequantize_4bit, quantize_4bit
from qmerge.quant.gptq import gptq_4bit, layer_hessian


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_hessian_gives_bitsandbytes_rounding(qt, dtype):
    """Nothing to feed back: the codes and state are quantize_4bit's (which is bit-exact with bitsandbytes)."""
    W = (torch.randn(96, 192, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    p, s = gptq_4bit(W, torch.eye(192), 64, qt, double_quant=False)
    p_ref, s_ref = quantize_4bit(W, 64, qt, False)
    assert torch.equal(p, p_ref) and torch.equal(s.absmax, s_ref.absmax) and s.dtype == dtype


def test_error_feedback_beats_rounding_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(128, 256, generator=g) * 0.02
    X = torch.randn(1024, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.1
    p, s = gptq_4bit(W, layer_hessian(X))
    p_ref, s_ref = quantize_4bit(W, 64, "nf4", True)
    assert torch.equal(s.absmax, s_ref.absmax)  # the same stored scales: only the codes differ

    def out_err(packed, state):
        return float(((X @ (dequantize_4bit(packed, state, torch.float32) - W).T) ** 2).mean())

    assert out_err(p, s) < 0.7 * out_err(p_ref, s_ref)
