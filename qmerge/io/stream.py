"""StreamingFileWriter: one file from a header and byte arrays that arrive one at a time, bounded memory.

Used by every output format (safetensors shards, GGUF files).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from ..errors import OutputError
from .direct import ALIGN, SequentialFile, aligned_buffer

_STAGE_BYTES = 16 * 2**20  # staging buffer size of the streaming writer (4 of them)
_EMPTY = np.zeros(0, dtype=np.uint8)


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array (no copy when it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else _EMPTY


class StreamingFileWriter:
    """Write one file from a header and byte arrays that arrive one at a time, with bounded memory.

    Each array handed to `write_bytes` goes to two threads that work while the caller computes the next
    one: a stager copies the bytes into page-aligned staging buffers and hashes each full buffer, and a
    writer appends full buffers to the file (see SequentialFile). At most `max_in_flight` bytes wait for
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
        if stage_bytes % ALIGN or stage_bytes <= 0 or stage_buffers < 1:
            raise ValueError(f"stage_bytes must be a positive multiple of {ALIGN}")
        self.path = Path(path)
        self.sha256: str | None = None
        self.bytes = 0
        try:
            self._out = SequentialFile(self.path)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror}).") from e
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue()  # (counted, bytes) for the stager; None ends
        self._full: queue.Queue = queue.Queue()  # (buffer, n) for the file writer; None ends
        self._free: queue.Queue = queue.Queue()  # staging buffers ready for reuse
        for _ in range(stage_buffers):
            self._free.put(aligned_buffer(stage_bytes))
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
            del item, data  # not kept while the next array is awaited (it may be a whole expert stack)
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
