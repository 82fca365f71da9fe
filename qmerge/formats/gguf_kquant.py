"""Calibrated GGUF of a type llama.cpp quantizes (K-quants, Q4_1, Q5_0, ...): llama.cpp's own file first (its
choice of type for every tensor), then the blocks of the layers 4-bit in training chosen again in place, at
the same offsets and size: Q4_K/Q5_K/Q6_K (and IQ4/Q4_0 where llama.cpp's file has them) by qmerge with GPTQ
error feedback, other types by llama.cpp's own quantizer with the calibration's importance matrix."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UnsupportedError
from ..pipeline.source import Source
from .calibration import calibrate, calibration_inputs, module_order
from .gguf import write_gguf_file
from .gguf_calibrated import CalibratedGGUF, details_of


def llama_cpp_file(source, path, kind, progress, base_only, tensor_types) -> tuple[dict, str]:
    """llama.cpp's own file of type `kind` at `path` (of the merged weights, or of the base with base_only):
    ({GGUF name: (type, data offset, bytes)}, tokenizer kind)."""
    import gguf

    plain = Source(source.base, None, source.quant, "dequantized") if base_only else source
    _, _, summary = write_gguf_file(plain, path, kind, progress, tensor_types)
    reader = gguf.GGUFReader(str(path))
    table = {t.name: (t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors}
    del reader  # its memory map, before the file is written
    return table, summary["tokenizer"]


def kquant_file(source, path, kind, quantized, calibration, max_tokens, progress, base_only, imatrix):
    """The 4-bit layers' blocks of llama.cpp's file at `path` (`quantized`: llama_cpp_file's) chosen again
    in place: the same tensors, types and size. ({}, details)."""
    table, tokenizer_kind = quantized
    cal = CalibratedGGUF(source, kind, base_only, types={n: t[0] for n, t in table.items()})
    if not cal.quantized:
        raise UnsupportedError(
            f"{source.base.path}: no layer that was 4-bit in training got a type that takes an importance "
            f"matrix in llama.cpp's {kind} (K-quants need rows of whole 256-weight super-blocks; llama.cpp fell "
            "back to other types). Calibrate --gguf-type iq4_nl instead."
        )
    model, tokens, mask = calibration_inputs(source, calibration, max_tokens, torch.float32)
    cal.tokens = int(mask.sum())
    fourbit = cal.layout(module_order(model))[1]
    with open(path, "r+b") as f:
        calibrate(_InPlace(f, table), model, cal, fourbit, tokens, mask, progress)
    return {}, details_of(cal, kind, tokenizer_kind, calibration, imatrix)


class _InPlace:
    """A sink that writes each tensor's bytes over the same tensor of an existing GGUF file."""

    def __init__(self, f, table: dict):
        self.f, self.table = f, table

    def write(self, name: str, data: np.ndarray) -> None:
        _, offset, nbytes = self.table[name]
        if data.nbytes != nbytes:
            raise AssertionError(f"{name}: {data.nbytes} bytes where llama.cpp's file holds {nbytes}")
        self.f.seek(offset)
        self.f.write(data.tobytes())
