"""The vision projector GGUF (llama.cpp's `mmproj` file) of a vision-language model, written by streaming
the merged vision tower and projector as the text GGUF streams the language model: what the fine-tune
changed in the vision tower reaches the image side too. Tensor types follow llama.cpp's converter: norms,
biases and position embeddings in F32, the rest in the file's type (f16 for types llama.cpp quantizes:
its quantizer does not take projector files)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..io.atomic import OutputFile, atomic_file, describe_files
from ..io.gguf.mmproj import Projector, VisionParams
from ..io.gguf.projectors import DIRECT, projector_of
from ..io.gguf.writer import (
    DIRECT_TYPES,
    QMERGE_KEY,
    GGUFFile,
    GGUFTensor,
    add_file_type,
    encode_parts,
    ggml_type,
    header_bytes,
    not_written_by_qmerge,
    torch_dtype_for,
)
from ..pipeline.source import Source
from ..pipeline.stream import MergedTensor, Progress
from .gguf_meta import gguf_metadata
from .write import Layout, stream_into


def mmproj_type(gguf_type: str) -> str:
    """The projector file's type for a text GGUF of `gguf_type`."""
    return gguf_type if gguf_type in DIRECT_TYPES else "f16"


def vision_type(projector: Projector, name: str, new: str, shape: tuple[int, ...], gguf_type: str):
    """The GGML type of one projector tensor, by the converter's rules in its order: 1-D tensors and norms
    in F32, then what the projector forces, then position embeddings and non-weights in F32."""
    import gguf

    T = gguf.GGMLQuantizationType
    forced = projector.forced_type(name, new, gguf_type)
    if len(shape) <= 1 or new.endswith("_norm.weight"):
        return T.F32
    if forced is not None:
        return forced
    positions = {gguf.TENSOR_NAMES[k] for k in (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.V_ENC_EMBD_POS)}
    if new.removesuffix(".weight") in positions:
        return T.F32
    return ggml_type(gguf_type, shape, new)  # (F32 for what is not a weight, as the converter keeps it)


def map_vision(projector: Projector, vp: VisionParams, shapes: dict, gguf_type: str) -> list[GGUFTensor]:
    """The projector file's tensors, in stored-name order, for the stored tensors `shapes`."""
    import gguf

    from ..errors import UnsupportedError

    # the projector's MLP (mm.0, mm.2) takes its numbers from the block range: at least that many
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vp.n_blocks, 8))
    out = []
    for hf in sorted(shapes):
        name = projector.name(hf)
        if name is None:
            continue
        pieces = projector.split(name, tuple(shapes[hf]), vp)
        for i, (piece, shape) in enumerate(pieces or [(name, tuple(shapes[hf]))]):
            new = piece if piece in DIRECT else names.get_name(piece, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise UnsupportedError(
                    f"tensor {hf} has no counterpart in llama.cpp's vision projector file."
                )
            qtype = vision_type(projector, name, new, shape, gguf_type)
            out.append(GGUFTensor(hf, new, shape, qtype, (), i if pieces else None))
    if not out:
        raise UnsupportedError("this checkpoint stores no vision tower: there is no projector to write.")
    return out


class Mmproj:
    """One projector GGUF of a direct type, streamed: each stored tensor is merged, changed and encoded
    as it arrives."""

    def __init__(self, source: Source, gguf_type: str):
        self.gguf_type = mmproj_type(gguf_type)
        self.projector, self.vp = projector_of(source.config, source.base.path, source.tokenizer_dir)
        shapes = {n: s.shape for n, s in source.tensors.items()}
        self.tensors = map_vision(self.projector, self.vp, shapes, self.gguf_type)
        self._by_name: dict[str, list[GGUFTensor]] = {}
        for t in self.tensors:
            self._by_name.setdefault(t.hf_name, []).append(t)

    def layout(self, source: Source) -> Layout:
        order = list(self._by_name)
        return Layout(
            order=order,
            dtypes={hf: torch_dtype_for(self._by_name[hf][0].qtype) for hf in order},
            nbytes={hf: sum(g.nbytes for g in self._by_name[hf]) for hf in order},
        )

    def encode(self, t: MergedTensor) -> list[tuple[str, np.ndarray]]:
        gs = self._by_name[t.name]
        name = self.projector.name(t.name)
        value = self.projector.transform(name, t.value, self.vp)
        values = self.projector.cut(name, value) if gs[0].piece is not None else [value]
        return [
            (g.name, encode_parts(v.contiguous(), g.qtype, g.hf_name))
            for g, v in zip(gs, values, strict=True)
        ]

    def head(self, source: Source, scratch: Path, name: str | None) -> tuple[bytes, int]:
        import gguf

        w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
        w.add_type(gguf.GGUFType.MMPROJ)
        gguf_metadata(source, self.gguf_type, name).set_gguf_meta_model(w)
        w.add_string(QMERGE_KEY, __version__)  # recognised by --force: a file qmerge wrote
        add_file_type(w, self.gguf_type)
        self.projector.add_metadata(w, self.vp)
        return header_bytes(w, self.tensors, [], scratch)

    def write(self, source: Source, path: Path, progress: Progress | None) -> tuple[int, dict]:
        head, align = self.head(source, path.with_name(path.name + ".head"), source.gguf_name)
        return stream_into(GGUFFile(path, head, align), source, self, self.layout(source), progress)


def write_mmproj(
    source: Source, fmt: Mmproj, out: Path, force: bool = False, progress: Progress | None = None
) -> tuple[OutputFile, dict]:
    """Write the vision projector `fmt` of `source` at `out`, atomically: (the file, what the report says of
    it)."""
    start = time.perf_counter()
    with atomic_file(Path(out), force, source.inputs(), not_written_by_qmerge) as tmp:
        merged, digests = fmt.write(source, tmp, progress)
        (described,) = describe_files(tmp, digests)
    record = OutputFile(str(out), described.bytes, described.sha256)
    return record, {
        "path": str(out),
        "projector_type": fmt.projector.projector_type,
        "gguf_type": fmt.gguf_type,
        "tensors": len(fmt.tensors),
        "tensors_merged": merged,
        "seconds": round(time.perf_counter() - start, 3),
    }
