"""The codec against bitsandbytes 0.50 itself: same codes, same scale bytes, same dequantized values."""

from __future__ import annotations

import subprocess
import sys

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmerge.quant.blockwise import (
    bits_per_param,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise_8bit,
    quantize_4bit,
    quantize_blockwise_8bit,
)
from qmerge.quant.codebooks import BLOCKSIZES_4BIT, code_4bit, dynamic_map

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _zero_signless(mine: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both with -0.0 where both are zero. qmerge decodes FP4 code 0b1000 as -0.0, as bitsandbytes' CUDA
    kernel (dDequantizeFP4Tree: 0 * sign) does; its CPU kernel gives +0.0 there (bitsandbytes 0.50.2 on an
    AVX-512 machine). The values are equal."""
    both = (mine == 0) & (ref == 0)
    return torch.where(both, -0.0, mine), torch.where(both, -0.0, ref)


def test_codebooks_equal_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_4bit(qt), F.get_4bit_type(qt, device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 24))
    cols = draw(st.integers(1, 200))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 0.02, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, cols, generator=g) * scale
    if draw(st.booleans()):
        A[0, : min(cols, 70)] = 0  # an all-zero block
    return (
        A,
        draw(st.sampled_from(DTYPES)),
        draw(st.sampled_from(BLOCKSIZES_4BIT)),
        draw(st.sampled_from(["nf4", "fp4"])),
        draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_quantize_4bit_bit_exact(case):
    A, dtype, bs, qt, dq = case
    A = A.to(dtype)
    p_ref, s_ref = F.quantize_4bit(A, blocksize=bs, compress_statistics=dq, quant_type=qt)
    p, s = quantize_4bit(A, bs, qt, dq)
    assert torch.equal(p, p_ref), "packed codes differ"
    assert torch.equal(s.absmax, s_ref.absmax), "absmax bytes differ"
    assert s.dtype == s_ref.dtype and tuple(s.shape) == tuple(s_ref.shape)
    if dq:
        assert torch.equal(s.nested_absmax, s_ref.state2.absmax)
        assert torch.equal(s.offset, s_ref.offset)
        assert torch.equal(s.nested_code, s_ref.state2.code)
    # dequantize: against bitsandbytes' own dequantize_4bit where its CPU kernel covers the shape
    # (rows whole blocks, width a multiple of 16), else against its pure-torch default backend.
    mine = dequantize_4bit(p, s)
    if A.shape[-1] % 16 == 0 and A.shape[-1] % bs == 0:
        ref = F.dequantize_4bit(p_ref, s_ref)
        if qt == "fp4":  # the sign of FP4 0b1000's zero: CUDA's -0.0 here, bitsandbytes' CPU kernel +0.0
            mine, ref = _zero_signless(mine, ref)
    else:
        absmax = (F.dequantize_blockwise(s_ref.absmax, s_ref.state2) + s_ref.offset) if dq else s_ref.absmax
        code = F.get_4bit_type(qt, device="cpu")
        if qt == "fp4":  # the native kernels decode 0b1000 as -0.0; the default backend reads the table
            code[8] = -0.0
        ref = _dequantize_4bit_compute(p_ref.reshape(-1), absmax, code, bs, s_ref.shape, dtype)
    assert torch.equal(_bits(mine), _bits(ref))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**31 - 1), st.sampled_from([1e-6, 1e-3, 1.0, 100.0]))
def test_quantize_blockwise_8bit_bit_exact(n, seed, scale):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, generator=g) * scale
    q_ref, st_ref = F.quantize_blockwise(A, blocksize=256)
    q, absmax = quantize_blockwise_8bit(A, dynamic_map(), 256)
    assert torch.equal(q, q_ref)
    assert torch.equal(absmax, st_ref.absmax)
    assert torch.equal(
        dequantize_blockwise_8bit(q, absmax, st_ref.code, 256), F.dequantize_blockwise(q_ref, st_ref)
    )


def test_double_quant_dequantized_scales_match():
    A = torch.randn(300, 257) * 0.05
    p_ref, s_ref = F.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, s = quantize_4bit(A, 64, "nf4", True)
    expected = F.dequantize_blockwise(s_ref.absmax, s_ref.state2) + s_ref.offset
    assert torch.equal(dequantize_absmax(s), expected)


def test_fp32_product_before_cast():
    """dtype=float32 gives code*absmax unrounded; the default casts once to the state dtype (as bitsandbytes)."""
    A = (torch.randn(64, 128) * 0.02).bfloat16()
    p, s = quantize_4bit(A, 64, "nf4", True)
    full = dequantize_4bit(p, s, torch.float32)
    assert full.dtype == torch.float32
    assert torch.equal(full.bfloat16(), dequantize_4bit(p, s))


@pytest.mark.parametrize("dq,expected", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)])
def test_bits_per_param_large_tensor(dq, expected):
    # 64 * 256 * 4 blocks of 64: nested blocks are whole, so the overhead is exactly the textbook one
    # (0.127 bit/param with double quant, 0.5 without), plus one 32-bit offset per tensor.
    A = torch.randn(256, 256)  # 1024 blocks of 64 = 4 whole nested blocks of 256
    _, s = quantize_4bit(A, 64, "nf4", dq)
    n = A.numel()
    offset = 32 / n if dq else 0.0
    assert bits_per_param(s) == pytest.approx(expected + offset, abs=1e-9)


def test_codec_works_without_bitsandbytes():
    """The codec must not need bitsandbytes at run time (a machine without its native library)."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch\n"
        "from qmerge.quant.blockwise import quantize_4bit, dequantize_4bit\n"
        "p, s = quantize_4bit(torch.randn(8, 64), 64, 'nf4', True)\n"
        "print(dequantize_4bit(p, s).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([8, 64])" in out.stdout


@pytest.mark.parametrize(
    "blocksize,dtype", [(64, torch.bfloat16), (4096, torch.float32), (32, torch.float16)]
)
def test_large_tensor_across_chunks(blocksize, dtype):
    """Several of the codec's 2**18-element passes, with a partial last block and an odd count."""
    A = (torch.randn(700 * 1000 + 77) * 0.05).to(dtype)
    p_ref, s_ref = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    p, s = quantize_4bit(A, blocksize, "nf4", True)
    assert (
        torch.equal(p, p_ref)
        and torch.equal(s.absmax, s_ref.absmax)
        and torch.equal(s.nested_absmax, s_ref.state2.absmax)
    )


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_bf16_nested_dtype_dequantizes_as_bitsandbytes(qt):
    """States saved after a CPU forward carry nested_dtype bfloat16; bitsandbytes then rounds the offset
    and the scales to bf16 (tested on a fresh fp32 offset, which real checkpoints already round)."""
    from qmerge.quant.blockwise import QuantState

    W = torch.randn(64, 128) * 0.05
    p, s = quantize_4bit(W, 64, qt, True)
    s = QuantState(**{**s.__dict__, "nested_dtype": torch.bfloat16})
    st2 = F.QuantState(absmax=s.nested_absmax, code=s.nested_code, blocksize=256, dtype=torch.bfloat16)
    ref_state = F.QuantState(
        absmax=s.absmax,
        shape=torch.Size(s.shape),
        code=s.code,
        blocksize=64,
        quant_type=qt,
        dtype=s.dtype,
        offset=s.offset,
        state2=st2,
    )
    assert torch.equal(dequantize_4bit(p, s), F.dequantize_4bit(p, ref_state))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 40),
    st.integers(1, 6),
    st.sampled_from(DTYPES),
    st.sampled_from([32, 64, 128]),
    st.sampled_from(["nf4", "fp4"]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_reproduce_equals_the_round_trip(rows, blocks, dtype, bs, qt, dq, seed):
    """Dequantized values straight from the codes are the packed round trip's, bit for bit."""
    from qmerge.quant.reproduce import reproduce_4bit, reproduce_rows

    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(rows, blocks * bs, generator=g) * 0.02).to(dtype)
    A[0, : min(bs, A.shape[1])] = 0  # an all-zero block
    p, s = quantize_4bit(A, bs, qt, dq)
    want = dequantize_4bit(p, s, torch.float32, round_to=dtype)
    assert torch.equal(_bits(reproduce_4bit(A, bs, qt, dq)), _bits(want))
    got = torch.cat([w for _, _, w in reproduce_rows(A, bs, qt, dq, 3)])
    assert torch.equal(_bits(got), _bits(want))


def test_quantize_leaves_its_input_alone():
    """An fp32 input used to be scaled in place (its .float() is itself): the caller's tensor must not change."""
    A = torch.randn(4, 128) * 0.02
    before = A.clone()
    quantize_4bit(A, 64, "nf4", True)
    assert torch.equal(A, before)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_reproduce_at_the_midpoints(qt):
    """Values on a midpoint, and one float either side, round as bitsandbytes rounds them (ties to the
    lower code): the ranges where qmerge's table lookup needs its exact comparison."""
    from qmerge.quant.blockwise import _sorted_code
    from qmerge.quant.reproduce import reproduce_4bit

    mid, _ = _sorted_code(qt)
    near = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])
    near = torch.cat([near, torch.ones(64 - len(near) % 64 or 64)])  # absmax 1.0: y is the value itself
    A = near[: len(near) // 64 * 64].view(-1, 64)
    p_ref, s_ref = F.quantize_4bit(A, blocksize=64, compress_statistics=False, quant_type=qt)
    p, s = quantize_4bit(A, 64, qt, False)
    assert torch.equal(p, p_ref)
    want = dequantize_4bit(p, s, torch.float32, round_to=torch.float32)
    assert torch.equal(_bits(reproduce_4bit(A, 64, qt, False)), _bits(want))
