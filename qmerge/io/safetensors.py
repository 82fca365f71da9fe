"""The safetensors format: header parsing with validation, tensor reads, and a header-first writer.

The reader parses the header itself and reads each tensor with a positioned read instead of mmap, so
pages of tensors already processed do not stay in the process's resident set. Every header is checked
against the file before any tensor is read (as the safetensors library checks it: known dtypes, sizes
equal to shape x itemsize, offsets that tile the data buffer exactly, no duplicate names), so nothing is
allocated from a number the file claims. The writer lays out the header first from a plan of (name,
dtype, shape) and takes the tensors one at a time in that order. `safetensors.torch.save_file` is the
reference for both in tests (same bytes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..errors import InputError
from .direct import read_range
from .files import open_regular
from .stream import StreamingFileWriter, tensor_bytes

# safetensors dtype names <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
# Sort order of safetensors' Dtype enum (safetensors/src/tensor.rs): save_file orders tensors by
# descending dtype, then by name.
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"tensor {k!r} appears twice")
        seen[k] = v
    return seen


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, __metadata__)."""
    try:
        with open_regular(path) as f:
            size = f.seek(0, 2)
            f.seek(0)
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(
                    f"{path}: not a safetensors file (only {size} bytes). Re-save or re-download it."
                )
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(
                    f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, file has "
                    f"{size}). Re-save or re-download it."
                )
            header = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e}).") from e
    try:
        meta = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: corrupt safetensors header ({e}). Re-save or re-download it.") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object).")
    metadata = meta.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ is not an object).")
    infos = {name: _entry(path, name, entry, 8 + n) for name, entry in meta.items()}
    _check_tiling(path, infos, 8 + n, size - 8 - n)
    return infos, metadata


def _entry(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, bytes = shape x itemsize."""
    where = f"{path}: header entry for tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise InputError(f"{where} lacks dtype, shape or data_offsets. The file is corrupt.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise InputError(f"{where}: dtype {dtype!r} is not one qmerge reads ({', '.join(DTYPES)}).")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"{where}: data_offsets {offsets!r} are not two increasing byte offsets.")
    start, end = offsets
    if end - start != prod(shape) * ITEMSIZE[dtype]:
        raise InputError(
            f"{where}: shape {shape} {dtype} needs {prod(shape) * ITEMSIZE[dtype]} bytes but data_offsets "
            f"give {end - start}. The file is corrupt."
        )
    return TensorInfo(name, dtype, tuple(shape), base + start, base + end)


def _check_tiling(path: Path, infos: dict[str, TensorInfo], base: int, data_bytes: int) -> None:
    """The tensors tile the data buffer: no gap, no overlap, nothing past its end (as safetensors checks)."""
    pos = base
    for info in sorted(infos.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            what = "overlaps the tensor before it" if info.start < pos else "leaves a gap before it"
            raise InputError(f"{path}: tensor {info.name!r} {what} (data_offsets). The file is corrupt.")
        pos = info.end
    if pos - base != data_bytes:
        raise InputError(
            f"{path}: the header's tensors cover {pos - base} bytes but the file holds {data_bytes} after the "
            "header (truncated, or bytes appended). Re-save or re-download it."
        )


class SafetensorsFile:
    """One safetensors file, read tensor by tensor with positioned reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor `name` (or rows [start, stop) of its first dimension) into a new CPU tensor."""
        info = self.tensors[name]
        start, end, shape = info.start, info.end, info.shape
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            start, end = info.start + rows[0] * row_bytes, info.start + rows[1] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if end == start:
            return torch.empty(shape, dtype=info.torch_dtype)
        try:
            data = read_range(self.path, start, end)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read tensor {name!r} ({e.strerror}).") from e
        except MemoryError as e:
            raise InputError(
                f"{self.path}: tensor {name!r} is {list(shape)} {info.dtype} ({(end - start) / 2**30:,.1f} GiB), "
                "more than this machine's memory can hold. Its header is wrong (an adapter's tensors are "
                "megabytes), or the model needs a machine with more RAM."
            ) from e
        if len(data) != end - start:
            raise InputError(
                f"{self.path}: truncated while reading tensor {name!r}. Re-save or re-download it."
            )
        return torch.frombuffer(data, dtype=info.torch_dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor a writer will receive: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEMSIZE[self.dtype]


def safetensors_order(entries: Sequence[PlannedTensor]) -> list[PlannedTensor]:
    """Order entries as safetensors.torch.save_file lays them out (dtype descending, then name)."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.index(e.dtype), e.name))


def header_bytes(entries: Sequence[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header for tensors laid out in `entries` order (as save_file writes it)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


class StreamingSafetensorsWriter(StreamingFileWriter):
    """Write one safetensors file whose tensors arrive one at a time, in the planned order.

    The header is laid out first from the plan; `write` then checks that each tensor is the one the plan
    expects next (name, dtype, shape) and streams its bytes (see StreamingFileWriter). `close` fails if any
    planned tensor is missing.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[PlannedTensor],
        metadata: dict[str, str] | None = None,
        max_in_flight: int = 512 * 2**20,
        stage_bytes: int | None = None,
        stage_buffers: int = 4,
    ):
        self.entries = list(entries)
        self._next = 0
        head = header_bytes(self.entries, metadata)
        super().__init__(path, head, max_in_flight, stage_bytes, stage_buffers)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._raise_pending()
        if self._next >= len(self.entries):
            raise RuntimeError(
                f"{self.path}: got tensor {name!r} after the planned {len(self.entries)} tensors"
            )
        e = self.entries[self._next]
        if name != e.name:
            raise RuntimeError(f"{self.path}: expected tensor {e.name!r} next, got {name!r}")
        if DTYPE_NAMES.get(tensor.dtype) != e.dtype or tuple(tensor.shape) != e.shape:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {e.dtype} {list(e.shape)}"
            )
        self.write_bytes(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._out.fd < 0:
            return
        super().close()
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            self.sha256 = None
            raise RuntimeError(f"{self.path}: closed before tensor {missing!r} was written")
