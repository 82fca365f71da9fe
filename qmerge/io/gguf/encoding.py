"""A tensor's GGML type in a GGUF file and its bytes in that type, as llama.cpp's converter types and
encodes them (gguf-py's quantizer for Q8_0)."""

from __future__ import annotations

import numpy as np
import torch

from ...dtypes import cast_finite
from ..stream import tensor_bytes


def ggml_type(gguf_type: str, shape: tuple[int, ...], name: str = ""):
    """The GGML type a tensor of `shape` named `name` (its GGUF name) gets in a file of `gguf_type` (a
    direct type)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32" or _kept_f32(name) or not name.endswith(".weight"):
        return T.F32  # (not a weight: biases, and the SSM's A and D, named without a suffix)
    if name.endswith("_norm.weight"):
        return T.F32  # a norm held 2-D (an SSM's per-group norm)
    if gguf_type == "f16":
        return T.F16
    if gguf_type == "bf16":
        return T.BF16
    # q8_0 needs rows that are whole 32-value blocks; llama.cpp's converter falls back the same way.
    return T.Q8_0 if shape[-1] % 32 == 0 else T.F16


def _kept_f32(name: str) -> bool:
    """The 2-D weights llama.cpp keeps in F32 whatever the file's type (its converter and its quantizer):
    the MoE routers, the SSM convolution, Gemma 3n's AltUp coefficients, learned positions (GPT-2). (Biases,
    2-D for stacked experts, stay F32 too.)"""
    import gguf

    routers = (
        gguf.MODEL_TENSOR.FFN_GATE_INP,
        gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
        gguf.MODEL_TENSOR.SSM_CONV1D,
        gguf.MODEL_TENSOR.ALTUP_CORRECT_COEF,
        gguf.MODEL_TENSOR.ALTUP_PREDICT_COEF,
        gguf.MODEL_TENSOR.POS_EMBD,
        gguf.MODEL_TENSOR.TOKEN_TYPES,
    )
    kinds = {gguf.TENSOR_NAMES[k].rsplit(".", 1)[-1] for k in routers}  # "ffn_gate_inp", ...
    pieces = name.split(".")  # blk.N.KIND.weight, KIND.weight
    return len(pieces) > 1 and pieces[-2] in kinds


def torch_dtype_for(qtype) -> torch.dtype:
    """The dtype a tensor is merged into before encoding as `qtype` (quantized types start from fp32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(qtype, torch.float32)


def encode(t: torch.Tensor, qtype, name: str = "") -> np.ndarray:
    """A torch tensor in the bytes GGUF stores for `qtype` (F32, F16, BF16 or Q8_0), as flat uint8.

    F16 and BF16 are torch's round-to-nearest-even casts, the same values numpy and gguf-py produce; a cast
    that would turn finite values into inf is refused (dtypes.cast_finite).
    """
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16, T.BF16):
        return tensor_bytes(cast_finite(t, torch_dtype_for(qtype), name))
    data = gguf.quants.quantize(t.float().contiguous().numpy(), qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


# the fp32 bytes quantized at a time (gguf-py's quantizer makes temporaries the size of its input)
_PART = 64 << 20


def encode_parts(t: torch.Tensor, qtype, name: str = "", rows: int | None = None) -> list[np.ndarray]:
    """encode()'s bytes as parts that, one after another, are the tensor's: quantized types a block of rows
    at a time (every GGUF type encodes a row on its own), so that quantizing never holds more than a block
    besides the tensor; and, where `rows` exceeds the tensor's, that many rows in all, the missing ones
    copies of the first (Gemma 3n's per-layer table, shorter than the vocabulary llama.cpp holds it for)."""
    import gguf

    T = gguf.GGMLQuantizationType
    n = t.shape[0] if t.dim() else 1
    if t.dim() < 2 or qtype in (T.F32, T.F16, T.BF16):
        parts = [encode(t, qtype, name)]  # (a view of the tensor's own bytes where its dtype is the type's)
    else:
        step = max(1, _PART // max(1, 4 * t[0].numel()))
        parts = [encode(t[i : i + step], qtype, name) for i in range(0, n, step)]
    if rows is not None and rows > n:
        parts.append(np.tile(encode(t[:1], qtype, name), rows - n))
    return parts


def type_nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size
