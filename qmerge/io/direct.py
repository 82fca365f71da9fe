"""Reads and writes that bypass the page cache (O_DIRECT) where the filesystem allows it.

Why: on the machines measured (docs/performance.md), copying gigabytes into or out of the page cache cost
more CPU than the merge's arithmetic. Every function here falls back to ordinary buffered I/O where
O_DIRECT, RWF_NOWAIT or preadv are missing (macOS, Windows, tmpfs, some network filesystems); the bytes
are the same either way.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (a page; covers 512 and 4096 sectors)
_DIRECT_READ_MIN = 1 << 20  # smaller reads always go through the page cache
_SYNC_EVERY = 256 * 2**20  # buffered writes (no O_DIRECT) are flushed to the disk every this many bytes


def aligned_buffer(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes whose address is a multiple of ALIGN."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


def read_range(path: Path, start: int, end: int) -> np.ndarray:
    """Bytes [start, end) of a file (fewer if it is shorter), as a uint8 array.

    Bytes already in the page cache are copied from it. A large range that is not (probed with
    RWF_NOWAIT, which reads only cached pages) is read with O_DIRECT into a page-aligned buffer. Where the
    probe or O_DIRECT is unavailable, an ordinary read is used.
    """
    n = end - start
    lo, hi = start - start % ALIGN, -(-end // ALIGN) * ALIGN
    buf = aligned_buffer(hi - lo)
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


class SequentialFile:
    """A file written front to back from page-aligned buffers, with O_DIRECT where the filesystem allows it.

    Where O_DIRECT is missing or a direct write is refused (EINVAL), the file falls back to ordinary
    buffered writes, flushed to the disk every `_SYNC_EVERY` bytes so the disk works while the next
    tensors are computed.
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
        """Append the first `n` bytes of `buf` (page-aligned, at least n rounded up to ALIGN long). Only the
        last write of a file may have n that is not a multiple of ALIGN."""
        if self.direct:
            padded = -(-n // ALIGN) * ALIGN
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
