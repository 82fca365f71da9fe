"""GGUF for llama.cpp, written straight from the merged tensors: f32/f16/bf16/q8_0 by qmerge itself, other
types (K-quants, legacy quants, IQ4) by llama.cpp's own quantizer from an intermediate file."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import llama_cpp
from ..errors import UnsupportedError
from ..io.atomic import OutputFile, atomic_file, describe_files
from ..io.gguf.families import architecture_of
from ..io.gguf.rope import rope_tensors
from ..io.gguf.vlm import note_text_only
from ..io.gguf.writer import (
    DIRECT_TYPES,
    LLAMA_CPP_TYPES,
    GGUFFile,
    encode_parts,
    gguf_head,
    map_tensors,
    not_written_by_qmerge,
    supported_types,
    torch_dtype_for,
)
from ..names import GGUF_OWN_CALIBRATED_TYPES, GGUF_TENSOR_TYPES
from ..pipeline.source import Source
from ..pipeline.stream import MergedTensor, Progress
from ..reports import WriteReport
from .gguf_meta import gguf_metadata
from .options import TensorTypes
from .write import Layout, stream_into

# llama.cpp quantizes from a GGUF file: qmerge writes an f32 one first (bf16 beyond this many
# parameters, to bound the disk the intermediate takes).
_F32_INTERMEDIATE_MAX = 3e9
# --calibrate applies to every type llama.cpp quantizes (formats/options.py's CALIBRATED_TYPES); of those,
# qmerge writes these files itself (the others are llama.cpp's files with the 4-bit layers' blocks chosen again)
OWN_CALIBRATED_TYPES = GGUF_OWN_CALIBRATED_TYPES
# GGML types llama.cpp's quantizer can give the token embedding or the output layer
TENSOR_TYPES = GGUF_TENSOR_TYPES


def check_type(gguf_type: str) -> str:
    gguf_type = gguf_type.lower()
    if gguf_type not in DIRECT_TYPES + LLAMA_CPP_TYPES:
        raise UnsupportedError(
            f"GGUF type {gguf_type!r} is not supported; choose one of: {supported_types()}."
        )
    return gguf_type


def _rows(value: torch.Tensor, g) -> int | None:
    """The rows the GGUF holds where the value has fewer rows of the same shape (encode_parts pads them)."""
    return g.shape[0] if value.dim() > 1 and tuple(value.shape[1:]) == tuple(g.shape[1:]) else None


class GGUF:
    """One GGUF file of a direct type (f32, f16, bf16, q8_0). An MoE projection's experts arrive one at a
    time into one stacked tensor, written when the last arrives: the stack is the largest tensor held."""

    def __init__(self, source: Source, gguf_type: str):
        self.gguf_type = gguf_type
        self.arch, self.hp = architecture_of(source.config)
        note_text_only(self.arch, source)
        self.tensors = map_tensors(
            self.arch, self.hp, {n: s.shape for n, s in source.tensors.items()}, gguf_type
        )
        self.extra = rope_tensors(self.arch, self.hp)
        self._by_name: dict[str, list] = {}  # stored tensor -> the GGUF tensors it is (part of)
        for t in self.tensors:
            for hf in t.sources:
                self._by_name.setdefault(hf, []).append(t)
        self._stack: torch.Tensor | None = None  # the stack being filled, one expert at a time

    def layout(self, source: Source) -> Layout:
        order = list(self._by_name)
        first = {hf: g[0] for hf, g in self._by_name.items()}
        return Layout(
            order=order,
            dtypes={hf: None if self.arch.merge_fp32 else torch_dtype_for(first[hf].qtype) for hf in order},
            # a stack's room is asked for by its first expert, whole: the one before it is written out first
            nbytes={
                hf: sum(g.nbytes for g in self._by_name[hf]) if hf == first[hf].sources[0] else 0
                for hf in order
            },
        )

    def encode(self, t: MergedTensor) -> list[tuple[str, list[np.ndarray]]]:
        gs = self._by_name[t.name]
        value = self.arch.transform(t.name, t.value, self.hp)
        if gs[0].parts:  # the layout gives the experts in order, one after another
            expert = gs[0].parts.index(t.name)
            if expert == 0:
                self._stack = torch.empty(gs[0].shape, dtype=value.dtype)
            self._stack[expert] = value
            if expert + 1 < len(gs[0].parts):
                return []
            value, self._stack = self._stack, None
        values = (
            [value] if gs[0].piece is None else self.arch.cut(self.arch.text_name(t.name), value, self.hp)
        )
        return [
            (g.name, encode_parts(v.contiguous(), g.qtype, g.hf_name, _rows(v, g)))
            for g, v in zip(gs, values, strict=True)
        ]

    def write(self, source: Source, path: Path, progress: Progress | None) -> tuple[int, dict, dict]:
        """Stream the file to `path`: (tensors merged, {file name: sha256}, summary)."""
        head, align, tokenizer = gguf_head(
            self.arch,
            self.hp,
            self.tensors,
            self.extra,
            self.gguf_type,
            gguf_metadata(source, self.gguf_type, source.gguf_name),
            source.tokenizer_dir,
            path.with_name(path.name + ".head"),
        )
        sink = GGUFFile(path, head, align)
        try:
            for extra_name, values in self.extra:
                sink.write(extra_name, values.reshape(-1).view(np.uint8))
        except BaseException:
            sink.abort()
            raise
        merged, digests = stream_into(sink, source, self, self.layout(source), progress)
        counts = type_counts(t.qtype for t in self.tensors)
        return (
            merged,
            digests,
            {"gguf_architecture": self.arch.gguf_arch, "tensor_types": counts, "tokenizer": tokenizer},
        )


def write_gguf(
    source: Source,
    out: Path,
    gguf_type: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
    tensor_types: TensorTypes = TensorTypes(),
) -> WriteReport:
    """Write `source` as a GGUF file at `out`, atomically."""
    start = time.perf_counter()
    gguf_type = check_type(gguf_type)
    out = Path(out)
    with atomic_file(out, force, source.inputs(), not_written_by_qmerge) as tmp:
        merged, digests, summary = write_gguf_file(source, tmp, gguf_type, progress, tensor_types)
        files = describe_files(tmp, digests)
    files = [OutputFile(out.name, f.bytes, f.sha256) for f in files]
    return WriteReport(
        str(out), files, merged, time.perf_counter() - start, {"gguf_type": gguf_type, **summary}
    )


def write_gguf_file(
    source: Source,
    path: Path,
    gguf_type: str,
    progress: Progress | None = None,
    tensor_types: TensorTypes = TensorTypes(),
) -> tuple[int, dict, dict]:
    """Write `source` as a GGUF file of any supported type at `path` (no atomicity: the caller's), the token
    embedding and output layer of llama.cpp's types as `tensor_types` asks.
    Returns (tensors merged, {file name: sha256} where known, summary)."""
    if gguf_type in DIRECT_TYPES:
        return GGUF(source, gguf_type).write(source, path, progress)
    n_params = sum(torch.Size(s.shape).numel() for s in source.tensors.values())
    inter = "f32" if n_params < _F32_INTERMEDIATE_MAX else "bf16"
    fmt = GGUF(source, inter)  # refuses an unsupported model before anything is written
    _check_rows(fmt, tensor_types)
    mid = path.with_name(path.name + ".intermediate.gguf")  # named after the temporary: cleaned with it
    try:
        merged, _, summary = fmt.write(source, mid, progress)
        if progress:
            progress(f"llama.cpp quantizing to {gguf_type}", 0, 1)
        llama_cpp.quantize(mid, path, gguf_type, tensor_types.token_embedding, tensor_types.output)
    finally:
        mid.unlink(missing_ok=True)
    return merged, {}, {**summary, "intermediate": inter, "tensor_types": file_types(path)}


def _check_rows(fmt: GGUF, tensor_types: TensorTypes) -> None:
    """llama.cpp aborts on a forced type whose blocks do not divide the rows: one message instead."""
    import gguf

    asked = {"token_embd.weight": tensor_types.token_embedding, "output.weight": tensor_types.output}
    if tensor_types.output and "output.weight" not in {t.name for t in fmt.tensors}:
        asked["token_embd.weight"] = tensor_types.output  # tied: llama.cpp gives the embedding this type
    for t in fmt.tensors:
        if not asked.get(t.name):
            continue
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[asked[t.name].upper()]][0]
        if t.shape[-1] % block:
            raise UnsupportedError(
                f"{t.name}: rows of {t.shape[-1]} values are not whole {asked[t.name]} blocks of {block}; choose "
                "a type with smaller blocks (q8_0, q5_0, q4_0: 32; f16)."
            )


def file_types(path: Path) -> dict:
    """{GGML type name: how many tensors} of the GGUF file at `path`."""
    import gguf

    return type_counts(t.tensor_type for t in gguf.GGUFReader(str(path)).tensors)


def type_counts(qtypes) -> dict[str, int]:
    """{GGML type name: how many tensors have it}, in first-seen order (the JSON's `tensor_types`)."""
    return dict(Counter(q.name for q in qtypes))
