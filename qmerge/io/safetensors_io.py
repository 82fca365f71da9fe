"""Streaming safetensors reading and writing with bounded memory.

The reader parses the header itself and reads each tensor with a positioned read instead of mmap, so
pages of tensors already processed do not stay in the process's resident set (mmap'd pages count in
RSS). The writer lays out the header first from a plan of (name, dtype, shape) and then takes the
tensors one at a time, in the order the header gives, so a shard never has to sit in memory.
The `safetensors` package is the reference for both in tests (same bytes as safetensors.torch.save_file).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..errors import InputError, OutputError

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
# Sort order of safetensors' Dtype enum (safetensors/src/tensor.rs): save_file orders tensors by
# descending dtype, then by name.
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]
_MAX_HEADER = 100 * 1024 * 1024
_SYNC_EVERY = 256 * 2**20  # the writer thread fdatasyncs every this many bytes


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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
        raise InputError(f"{path}: cannot read ({e.strerror}).") from e
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header ({e}). Re-save or re-download it.") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object).")
    metadata = meta.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in meta.items():
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(int(d) for d in entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: corrupt header entry for tensor {name!r}.") from e
        if dtype not in DTYPES:
            raise InputError(f"{path}: tensor {name!r} has dtype {dtype}, which qmerge does not read.")
        itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if end - start != prod(shape) * itemsize or start < 0:
            raise InputError(
                f"{path}: tensor {name!r} declares shape {list(shape)} {dtype} but {end - start} bytes. "
                "The file is corrupt."
            )
        if base + end > size:
            raise InputError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes. "
                "Re-save or re-download it."
            )
        infos[name] = TensorInfo(name, dtype, shape, base + start, base + end)
    return infos, metadata


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
        buf = bytearray(end - start)
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                got = f.readinto(buf)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read tensor {name!r} ({e.strerror}).") from e
        if got != len(buf):
            raise InputError(f"{self.path}: truncated while reading tensor {name!r}.")
        if not buf:
            return torch.empty(shape, dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will receive: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * torch.empty(0, dtype=DTYPES[self.dtype]).element_size()


def safetensors_order(entries: Sequence[PlannedTensor]) -> list[PlannedTensor]:
    """Order entries as safetensors.torch.save_file lays them out (dtype descending, then name)."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK.index(e.dtype), e.name))


class StreamingSafetensorsWriter:
    """Write one safetensors file whose tensors arrive one at a time, in the planned order.

    The header is written first from the plan; `write` then checks that each tensor is the one the plan
    expects next (name, dtype, shape) and hands its bytes to a writer thread and then a hashing thread,
    which work while the caller computes the next tensor (at most `max_in_flight` bytes wait, so memory
    stays bounded). `close` fails if any planned tensor is missing; `sha256` and `bytes` are then set.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[PlannedTensor],
        metadata: dict[str, str] | None = None,
        max_in_flight: int = 512 * 2**20,
    ):
        self.path = Path(path)
        self.entries = list(entries)
        self._next = 0
        self.sha256: str | None = None
        self.bytes = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for e in self.entries:
            header[e.name] = {
                "dtype": e.dtype,
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8-byte alignment
        head = struct.pack("<Q", len(raw)) + raw
        self._hash = hashlib.sha256(head)
        try:
            self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()/abort()
            self._f.write(head)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}).") from e
        self.bytes = len(head)
        # Two stages, each on its own thread: write (mostly waiting on the disk), then hash (CPU), so
        # hashing tensor k overlaps writing tensor k + 1.
        self._queue: queue.Queue = queue.Queue()
        self._hash_queue: queue.Queue = queue.Queue()
        # Bytes handed over but not yet hashed; write() waits while more than max_in_flight are pending
        # (a single larger tensor may always go), which bounds the memory the pipeline holds.
        self._in_flight = 0
        self._unsynced = 0
        self._max_in_flight = max_in_flight
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"write-{self.path.name}", daemon=True)
        self._hasher = threading.Thread(target=self._digest, name=f"hash-{self.path.name}", daemon=True)
        self._thread.start()
        self._hasher.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._hash_queue.put(None)
                return
            name, data = item
            if self._error is not None:
                self._release(len(data))  # keep draining so the producer never blocks
                continue
            try:
                self._f.write(data)
                self.bytes += len(data)
                self._hash_queue.put(data)
                self._unsynced += len(data)
                if self._unsynced >= _SYNC_EVERY:
                    # Flush as we go: the disk works while the next tensors are computed, and close()
                    # does not wait for gigabytes of dirty pages at the end.
                    self._f.flush()
                    os.fdatasync(self._f.fileno())
                    self._unsynced = 0
            except BaseException as e:  # noqa: BLE001 - handed to the producer thread
                self._error = OutputError(
                    f"{self.path}: cannot write tensor {name!r} ({getattr(e, 'strerror', e)})."
                )
                self._error.__cause__ = e

    def _digest(self) -> None:
        while (data := self._hash_queue.get()) is not None:
            self._hash.update(data)
            self._release(len(data))

    def _release(self, n: int) -> None:
        with self._room:
            self._in_flight -= n
            self._room.notify_all()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_for_room(self, nbytes: int) -> None:
        """Block until `nbytes` more can be handed over without passing max_in_flight (a tensor larger than
        that waits for an empty pipeline). Callers that know the next tensor's size call it before computing
        that tensor, so the tensor being built and those waiting for the disk never add up past the bound."""
        with self._room:
            while self._in_flight and self._in_flight + nbytes > self._max_in_flight and self._error is None:
                self._room.wait()

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
        data = (
            memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""
        )
        self.wait_for_room(len(data))
        with self._room:
            self._in_flight += len(data)
        self._queue.put((name, data))
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._queue.put(None)
        self._thread.join()
        self._hasher.join()
        try:
            self._raise_pending()
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}).") from e
        finally:
            self._f.close()
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            raise RuntimeError(f"{self.path}: closed before tensor {missing!r} was written")
        self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        self._hasher.join()
        if not self._f.closed:
            self._f.close()
