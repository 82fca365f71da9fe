"""GGUF files written by streaming: tensor types, HF -> GGUF names, the header (metadata, vocabulary,
tensor infos, laid out by gguf-py's GGUFWriter), then each tensor's bytes as it arrives.

Mapping follows llama.cpp's convert_hf_to_gguf.py: tensor names from gguf.get_tensor_name_map, 1-D
tensors kept in F32, tied embeddings written once, q8_0 only for rows of whole 32-value blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import UnsupportedError
from ...names import GGUF_DIRECT_TYPES, GGUF_LLAMA_CPP_TYPES
from ..stream import StreamingFileWriter
from .arch import Architecture, HParams
from .encoding import encode, encode_parts, ggml_type, torch_dtype_for, type_nbytes
from .rope import add_rope_metadata, rope_tensors
from .vocab import add_tokenizer

QMERGE_KEY = "qmerge.version"
DIRECT_TYPES = GGUF_DIRECT_TYPES  # written by qmerge itself
LLAMA_CPP_TYPES = GGUF_LLAMA_CPP_TYPES  # quantized by llama.cpp's own quantizer from an intermediate GGUF


def supported_types() -> str:
    return ", ".join(DIRECT_TYPES + LLAMA_CPP_TYPES)


@dataclass(frozen=True)
class GGUFTensor:
    """One HF tensor as the GGUF file stores it, or (`parts`) the HF tensors of one MoE projection, one per
    expert in expert order, stacked into one 3-D tensor (hf_name is then the stack's name, no stored one)."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    parts: tuple[str, ...] = ()
    piece: int | None = None  # which of the tensors a stored tensor is split into (Architecture.split)

    @property
    def nbytes(self) -> int:
        return type_nbytes(self.shape, self.qtype)

    @property
    def sources(self) -> tuple[str, ...]:
        """The HF tensors this GGUF tensor is made of."""
        return self.parts or (self.hf_name,)


def map_tensors(
    arch: Architecture, hp: HParams, shapes: dict[str, tuple[int, ...]], gguf_type: str
) -> list[GGUFTensor]:
    """The GGUF tensors, in HF-name order, for the HF tensors `shapes` (unused ones left out: rotary
    inv_freq buffers, a tied lm_head); an MoE's per-expert tensors become one stacked tensor each."""
    import gguf

    (model_arch,) = [a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.gguf_arch]
    names = gguf.get_tensor_name_map(model_arch, hp.n_layers)
    out = []
    for hf, parts, shape in _stacked(arch, hp, shapes):
        text = arch.text_name(hf)
        if text is None or text.endswith("rotary_emb.inv_freq") or (text == "lm_head.weight" and hp.tied):
            continue
        pieces = arch.split(text, shape, hp)
        for i, (piece, piece_shape) in enumerate(pieces or [(text, shape)]):
            new = names.get_name(piece, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise UnsupportedError(f"tensor {hf} has no GGUF counterpart for {arch.hf_class}.")
            qtype = ggml_type(gguf_type, piece_shape, new)
            out.append(GGUFTensor(hf, new, piece_shape, qtype, parts, i if pieces else None))
    return out


def _stacked(
    arch: Architecture, hp: HParams, shapes: dict[str, tuple[int, ...]]
) -> list[tuple[str, tuple[str, ...], tuple]]:
    """(name, parts, shape) in name order: a tensor of its own (no parts), or a stack of stored tensors llama.cpp
    holds as one (Architecture.stack_of: an MoE projection's per-expert tensors), where the first of them
    sorts."""
    stacks: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    rows: list[tuple[str, tuple[str, ...], tuple]] = []
    for hf in sorted(shapes):
        found = arch.stack_of(hf, hp)
        if found is None:
            rows.append((hf, (), tuple(shapes[hf])))
            continue
        if found[0] not in stacks:
            rows.append((found[0], (), ()))  # its parts and shape once every piece is seen
        stacks.setdefault(found[0], {})[found[1]] = hf
        sizes[found[0]] = found[2]
    return [
        _stack(row[0], stacks[row[0]], shapes, sizes[row[0]]) if row[0] in stacks else row for row in rows
    ]


def _stack(name: str, parts: dict[int, str], shapes: dict, size: int) -> tuple[str, tuple[str, ...], tuple]:
    """One stack's pieces in order and the stacked shape, or UnsupportedError when some are missing or differ
    in shape."""
    part_shapes = {tuple(shapes[hf]) for hf in parts.values()}
    if sorted(parts) != list(range(size)) or len(part_shapes) != 1:
        raise UnsupportedError(
            f"{name}: the checkpoint stores pieces {sorted(parts)} of shapes {sorted(part_shapes)}; "
            f"config.json names {size} of one shape (experts), so they cannot be stacked for GGUF."
        )
    return name, tuple(parts[e] for e in range(size)), (size, *part_shapes.pop())


def gguf_head(
    arch: Architecture,
    hp: HParams,
    tensors: list[GGUFTensor],
    extra: list[tuple[str, np.ndarray]],
    gguf_type: str,
    meta,
    tokenizer_dir: Path,
    scratch: Path,
) -> tuple[bytes, int, str]:
    """(header bytes padded to the data alignment, the alignment, tokenizer kind): metadata, vocabulary and
    tensor infos as gguf-py's GGUFWriter lays them out (through a file at `scratch`, removed). `meta`: the
    general.* keys, a gguf.Metadata (formats/gguf_meta.py)."""
    import gguf

    w = gguf.GGUFWriter(None, arch.gguf_arch)
    _add_hparams(w, arch, hp, gguf_type, meta)
    tokenizer = add_tokenizer(w, tokenizer_dir, hp.vocab_size)
    if arch.gemma_norm and tokenizer == "llama":
        w.add_add_space_prefix(False)  # as convert_hf_to_gguf's GemmaModel
    head, align = header_bytes(w, tensors, extra, scratch)
    return head, align, tokenizer


def header_bytes(
    w, tensors: list[GGUFTensor], extra: list[tuple[str, np.ndarray]], scratch: Path
) -> tuple[bytes, int]:
    """(header bytes padded to the data alignment, the alignment) of a GGUFWriter `w` holding the metadata,
    once the tensor infos are added (through a file at `scratch`, removed)."""
    import gguf

    for extra_name, values in extra:
        w.add_tensor_info(extra_name, values.shape, np.float32, values.nbytes)
    for t in tensors:
        w.add_tensor_info(
            t.name,
            t.shape,
            np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16,
            t.nbytes,
            raw_dtype=t.qtype,
        )
    try:
        w.write_header_to_file(scratch)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    align = w.data_alignment
    return head + bytes(-len(head) % align), align


def _add_hparams(w, arch: Architecture, hp: HParams, gguf_type: str, meta) -> None:
    """The model's metadata keys, in the order convert_hf_to_gguf.py writes them."""

    meta.set_gguf_meta_model(w)
    w.add_string(QMERGE_KEY, __version__)  # recognised by --force: a file qmerge wrote
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.n_layers)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(arch.kv_heads(hp))
    w.add_rope_dimension_count(hp.rope_dims)
    arch.add_metadata(w, hp)
    if hp.head_dim != hp.hidden // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    if arch.layer_norm:
        w.add_layer_norm_eps(hp.norm_eps)
    else:
        w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_vocab_size(hp.vocab_size)
    add_rope_metadata(w, arch, hp)
    add_file_type(w, gguf_type)


def add_file_type(w, gguf_type: str) -> None:
    """general.file_type of a file qmerge writes itself, and the quantization version where it quantizes."""
    import gguf

    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "iq4_nl": gguf.LlamaFileType.MOSTLY_IQ4_NL,  # written by qmerge when calibrated
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "iq4_xs": gguf.LlamaFileType.MOSTLY_IQ4_XS,
    }[gguf_type]
    w.add_file_type(ftype)
    if gguf_type not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def not_written_by_qmerge(path: Path) -> str | None:
    """Why `path` is not a GGUF file qmerge wrote (None when it is one: --force may replace it)."""
    import gguf

    from ..kinds import is_gguf

    if not path.is_file() or not is_gguf(path):
        return "it is not a GGUF file"
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - a corrupt file is not one qmerge finished
        return "it is not a readable GGUF file"
    return None if QMERGE_KEY in fields else f"its metadata has no {QMERGE_KEY}"


class GGUFFile:
    """A GGUF file whose header is written first and whose tensors arrive one at a time, each padded to
    the data alignment as gguf-py pads them (a sink for the export loop)."""

    def __init__(self, path: Path, head: bytes, align: int):
        self.path = Path(path)
        self.align = align
        self._out = StreamingFileWriter(self.path, head)

    def wait_for_room(self, nbytes: int) -> None:
        self._out.wait_for_room(nbytes)

    def write(self, key: str, data: np.ndarray | list[np.ndarray]) -> None:
        """One tensor's bytes (or its parts, one after another: encode_parts), padded to the alignment."""
        parts = data if isinstance(data, list) else [data]
        for part in parts:
            self._out.write_bytes(part)
        if size := sum(len(part) for part in parts) % self.align:
            self._out.write_bytes(np.zeros(self.align - size, dtype=np.uint8))

    def close(self) -> dict[str, str]:
        self._out.close()
        return {self.path.name: self._out.sha256}

    def abort(self) -> None:
        self._out.abort()


__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "gguf_head",
    "map_tensors",
    "encode",
    "encode_parts",
    "rope_tensors",
    "torch_dtype_for",
]
