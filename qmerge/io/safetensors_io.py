"""Streaming safetensors reading and writing with bounded memory.

The reader parses the header itself and reads each tensor with a positioned read instead of mmap, so
pages of tensors already processed do not stay in the process's resident set (mmap'd pages count in
RSS). The writer lays out the header first from a plan of (name, dtype, shape) and then takes the
tensors one at a time, in the order the header gives, so a shard never has to sit in memory.
The `safetensors` package is the reference for both in tests (same bytes as safetensors.torch.save_file).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
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
_SYNC_EVERY = 256 * 2**20  # buffered writes (no O_DIRECT) are flushed to the disk every this many bytes
_STAGE_BYTES = 16 * 2**20  # staging buffer size of the streaming writer (4 of them)
_ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (a page; covers 512 and 4096 sectors)
_EMPTY = np.zeros(0, dtype=np.uint8)


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
        if end == start:
            return torch.empty(shape, dtype=info.torch_dtype)
        try:
            data = read_range(self.path, start, end)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read tensor {name!r} ({e.strerror}).") from e
        if len(data) != end - start:
            raise InputError(f"{self.path}: truncated while reading tensor {name!r}.")
        return torch.frombuffer(data, dtype=info.torch_dtype).reshape(shape)


_DIRECT_READ_MIN = 1 << 20  # smaller reads always go through the page cache


def read_range(path: Path, start: int, end: int) -> np.ndarray:
    """Bytes [start, end) of a file (fewer if it is shorter), as a uint8 array.

    Bytes already in the page cache are copied from it. A large range that is not (probed with
    RWF_NOWAIT, which reads only cached pages) is read with O_DIRECT into a page-aligned buffer: on the
    machines measured, filling the page cache cost more CPU than the disk took to deliver the data
    (docs/performance.md). Where the probe or O_DIRECT is unavailable, an ordinary read is used.
    """
    n = end - start
    lo, hi = start - start % _ALIGN, -(-end // _ALIGN) * _ALIGN
    buf = _aligned_buffer(hi - lo)
    view = buf[start - lo : start - lo + n]
    with open(path, "rb", buffering=0) as f:
        if n >= _DIRECT_READ_MIN and _uncached(f.fileno(), view, start):
            got = _read_direct(path, buf, lo)
            if got is not None:
                return view[: max(0, min(n, got - (start - lo)))]
        got = _read_into(f.fileno(), view, start)
    return view[:got]


def _uncached(fd: int, view: np.ndarray, start: int) -> bool:
    """True when the range is not (all) in the page cache; what is cached lands in `view` either way."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "O_DIRECT") or not hasattr(os, "preadv"):
        return False
    try:
        return os.preadv(fd, [view], start, flag) < len(view)
    except BlockingIOError:
        return True  # nothing of it is cached
    except OSError:
        return False  # the filesystem cannot tell (EOPNOTSUPP, EINVAL): read normally


def _read_direct(path: Path, buf: np.ndarray, offset: int) -> int | None:
    """Fill the page-aligned `buf` from `offset` (aligned) with O_DIRECT: bytes read, or None if refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    try:
        return _read_into(fd, buf, offset)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    finally:
        os.close(fd)


def _read_into(fd: int, view: np.ndarray, offset: int) -> int:
    """Positioned reads until `view` is full or the file ends (one read returns at most ~2 GiB)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [view[got:]], offset + got)
        else:  # Windows: no positioned vectored reads
            with io.FileIO(fd, "rb", closefd=False) as f:
                f.seek(offset + got)
                k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return got


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


class _SequentialFile:
    """A file written front to back from page-aligned buffers, bypassing the page cache (O_DIRECT) where
    the filesystem allows it.

    Why: on the machines measured (see docs/performance.md), copying gigabytes into the page cache cost
    more CPU than the whole merge's arithmetic, and the final fsync then waited for all of it. Direct
    writes from reused buffers cost neither. Where O_DIRECT is missing (macOS, tmpfs, some network
    filesystems) or a direct write is refused (EINVAL), the file falls back to ordinary buffered writes,
    flushed to the disk every `_SYNC_EVERY` bytes so the disk works while the next tensors are computed.
    """

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        self.direct = False
        self.size = 0  # bytes of the file's content written so far (without alignment padding)
        self._unsynced = 0
        if direct:
            try:
                self.fd = os.open(path, flags | direct, 0o644)
                self.direct = True
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        self.fd = os.open(path, flags, 0o644)

    def write(self, buf: np.ndarray, n: int) -> None:
        """Append the first `n` bytes of `buf` (page-aligned, at least n rounded up to _ALIGN long). Only the
        last write of a file may have n that is not a multiple of _ALIGN."""
        if self.direct:
            padded = -(-n // _ALIGN) * _ALIGN
            try:
                self._write_all(memoryview(buf)[:padded])
                self.size += n
                if padded != n:
                    os.ftruncate(self.fd, self.size)  # drop the padding; nothing may follow
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._go_buffered()
        self._write_all(memoryview(buf)[:n])
        self.size += n
        self._unsynced += n
        if self._unsynced >= _SYNC_EVERY:
            os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
            self._unsynced = 0

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            view = view[os.write(self.fd, view) :]

    def _go_buffered(self) -> None:
        """The filesystem refused a direct write: continue with buffered writes from where the file ends."""
        import fcntl

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        os.ftruncate(self.fd, self.size)
        os.lseek(self.fd, self.size, os.SEEK_SET)
        self.direct = False

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip : skip + nbytes]


class StreamingFileWriter:
    """Write one file from a header and byte arrays that arrive one at a time, with bounded memory.

    Each array handed to `write_bytes` goes to two threads that work while the caller computes the next
    one: a stager copies the bytes into page-aligned staging buffers and hashes each full buffer, and a
    writer appends full buffers to the file (see _SequentialFile). At most `max_in_flight` bytes wait for
    the stager (a single larger array may always go), plus `stage_buffers` x `stage_bytes` of staging.
    After `close`, `sha256` and `bytes` are set and the file is on the disk (fsync); `abort` stops
    without finishing it (the caller removes it). A failed write (disk full, I/O error) is raised as its
    OSError by the next `write_bytes` or by `close`, for the caller's atomic output to report.
    """

    def __init__(
        self,
        path: Path,
        head: bytes,
        max_in_flight: int = 512 * 2**20,
        stage_bytes: int | None = None,
        stage_buffers: int = 4,
    ):
        stage_bytes = stage_bytes or _STAGE_BYTES
        if stage_bytes % _ALIGN or stage_bytes <= 0 or stage_buffers < 1:
            raise ValueError(f"stage_bytes must be a positive multiple of {_ALIGN}")
        self.path = Path(path)
        self.sha256: str | None = None
        self.bytes = 0
        try:
            self._out = _SequentialFile(self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}).") from e
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue()  # (counted, bytes) for the stager; None ends
        self._full: queue.Queue = queue.Queue()  # (buffer, n) for the file writer; None ends
        self._free: queue.Queue = queue.Queue()  # staging buffers ready for reuse
        for _ in range(stage_buffers):
            self._free.put(_aligned_buffer(stage_bytes))
        # Bytes handed over but not yet staged; write_bytes() waits while more than max_in_flight are
        # pending, which bounds the memory the pipeline holds.
        self._in_flight = 0
        self._max_in_flight = max_in_flight
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._queue.put((False, np.frombuffer(head, dtype=np.uint8)))  # counts in no bound
        self._stager = threading.Thread(target=self._stage, name=f"stage-{self.path.name}", daemon=True)
        self._writer = threading.Thread(target=self._drain, name=f"write-{self.path.name}", daemon=True)
        self._stager.start()
        self._writer.start()

    # ---- the two threads ---------------------------------------------------------------------------
    def _stage(self) -> None:
        """Copy arriving arrays into staging buffers; hash and pass on each buffer when it is full."""
        buf, fill = self._free.get(), 0
        while (item := self._queue.get()) is not None:
            counted, data = item
            pos = 0
            while pos < len(data) and self._error is None:
                take = min(len(data) - pos, len(buf) - fill)
                buf[fill : fill + take] = data[pos : pos + take]  # numpy copies without the GIL
                fill, pos = fill + take, pos + take
                if fill == len(buf):
                    self._hash.update(buf)
                    self._full.put((buf, fill))
                    buf, fill = self._free.get(), 0
            if counted:
                self._release(len(data))
        if fill and self._error is None:
            self._hash.update(buf[:fill])
            self._full.put((buf, fill))
        self._full.put(None)

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            buf, n = item
            if self._error is None:
                try:
                    self._out.write(buf, n)
                    self.bytes += n
                except BaseException as e:  # noqa: BLE001 - handed to the producer thread, as it is:
                    self._error = e  # an OSError (ENOSPC, EIO) reaches atomic_dir/atomic_file's message
                    with self._room:
                        self._room.notify_all()
            self._free.put(buf)  # keeps the stager going, also after an error, so nobody blocks

    def _release(self, n: int) -> None:
        with self._room:
            self._in_flight -= n
            self._room.notify_all()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    # ---- the producer's side -----------------------------------------------------------------------
    def wait_for_room(self, nbytes: int) -> None:
        """Block until `nbytes` more can be handed over without passing max_in_flight (a larger array
        waits for an empty pipeline). Callers that know the next array's size call it before computing
        it, so the array being built and those waiting for the disk never add up past the bound."""
        with self._room:
            while self._in_flight and self._in_flight + nbytes > self._max_in_flight and self._error is None:
                self._room.wait()

    def write_bytes(self, data: np.ndarray) -> None:
        """Append a contiguous uint8 array (kept, not copied, until the stager has taken it)."""
        self._raise_pending()
        self.wait_for_room(len(data))
        with self._room:
            self._in_flight += len(data)
        self._queue.put((True, data))

    def _finish_threads(self) -> None:
        self._queue.put(None)
        self._stager.join()
        self._writer.join()

    def close(self) -> None:
        if self._out.fd < 0:
            return
        self._finish_threads()
        try:
            self._raise_pending()
            self._out.sync()  # an OSError goes up as it is (see _drain)
        finally:
            self._out.close()
        self.sha256 = self._hash.hexdigest()

    def abort(self) -> None:
        if self._stager.is_alive() or self._writer.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._finish_threads()
        self._out.close()


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (no copy when it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else _EMPTY


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
