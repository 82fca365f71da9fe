"""The last step of every output (atomic.atomic_output): the finished temporary renamed to OUT, only while
OUT is still what it was when the run started (nothing, or the qmerge output --force replaces), atomically
where the system can (Linux renameat2: NOREPLACE, EXCHANGE), with a check-then-rename fallback elsewhere."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

# Says why an existing OUT is not one qmerge wrote (None: it is, --force may replace it).
Ownership = Callable[[Path], str | None]


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _sibling(out: Path, what: str) -> Path:
    return out.with_name(f".{out.name}.qmerge-{what}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


# renameat2(2) flags (Linux): fail when the target exists; swap source and target atomically.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@functools.cache
def _renameat2():
    """glibc's renameat2, or None (another OS, an old glibc)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.renameat2
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when this system or file system lacks it;
    raises OSError (FileExistsError with NOREPLACE) as rename would."""
    f = _renameat2()
    if f is None:
        return False
    at_fdcwd = -100
    if f(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


def _appeared(out: Path) -> OutputError:
    return OutputError(
        f"{out} appeared during the run (it was not there, or not the same qmerge output, when the run "
        "started); it was left untouched and nothing was written. Move it away and run again."
    )


def _rename_noreplace(tmp: Path, out: Path) -> None:
    """Rename tmp to out, failing with _appeared when anything is at out (atomically where the system can)."""
    try:
        if _rename2(tmp, out, _RENAME_NOREPLACE):
            return
        if tmp.is_file() and not tmp.is_symlink() and _link(tmp, out):
            tmp.unlink()
            return
    except FileExistsError as e:
        raise _appeared(out) from e
    if os.path.lexists(out):  # no atomic way on this system: check, then rename
        raise _appeared(out)
    os.replace(tmp, out)


def _link(src: Path, dst: Path) -> bool:
    """Hard-link src at dst (never replaces an existing dst): False on a file system without hard links."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        return False
    return True


def _swap(tmp: Path, out: Path, before: os.stat_result, owned: Ownership | None) -> None:
    """Put tmp at out in place of the qmerge output `before` that was there at the start, failing with
    _appeared when out is now something else (atomically where the system can: the two swap, and swap
    back when what came out of out is not that output). Whatever was at out ends at tmp (removed after)."""

    def unchanged(p: Path) -> bool:
        try:
            now = os.lstat(p)
        except FileNotFoundError:
            return False
        # inode numbers are reused at once: a file or directory made anew (or written into) since the start
        # has another modification time, which a rename leaves as it is
        same = same_file(now, before) and (now.st_mtime_ns, now.st_size) == (
            before.st_mtime_ns,
            before.st_size,
        )
        return same and not (owned and owned(p))

    try:
        exchanged = _rename2(tmp, out, _RENAME_EXCHANGE)
    except FileNotFoundError:  # the output --force replaces is gone: nothing to swap with
        _rename_noreplace(tmp, out)
        return
    if exchanged:
        if not unchanged(tmp):
            _rename2(tmp, out, _RENAME_EXCHANGE)
            raise _appeared(out)
        return
    old = _sibling(out, f"old-{os.getpid()}")
    try:
        os.replace(out, old)
    except FileNotFoundError:  # gone, as above
        _rename_noreplace(tmp, out)
        return
    if not unchanged(old):
        _rename_noreplace(old, out)
        raise _appeared(out)
    try:
        _rename_noreplace(tmp, out)
    finally:
        _remove(old)  # the qmerge output --force replaces


# Called between the write and the rename with (tmp, out): the tests' way into that moment.
before_commit: list[Callable[[Path, Path], None]] = []


def commit(tmp: Path, out: Path, before: os.stat_result | None, owned: Ownership | None) -> None:
    """Put the finished tmp at out: out must still be what it was at the start (nothing, or the same
    qmerge output). Signals wait until it is done, so that an interrupt cannot split the swap."""
    for hook in before_commit:
        hook(tmp, out)
    with _signals_held():
        if before is None:
            _rename_noreplace(tmp, out)
        else:
            _swap(tmp, out, before, owned)


@contextmanager
def _signals_held() -> Iterator[None]:
    import signal
    import threading

    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
