"""Safe outputs: never an input, written beside the target and renamed into place only when complete,
one run at a time per target, and `--force` replaces only what qmerge wrote.

Names beside OUT (in its parent directory): `.OUT.qmerge-lock` while a run holds OUT,
`.OUT.qmerge-tmp-PID` (and `.OUT.qmerge-tmp-PID.*`) while it writes, `.OUT.qmerge-old-PID` for the
moment a forced replacement swaps directories. A run that was killed leaves its temporaries; the next
run on the same OUT removes them.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from .commit import Ownership, _remove, _sibling, commit, same_file


@dataclass(frozen=True)
class OutputFile:
    """A file written by qmerge: path relative to the output, size and sha256."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Inputs:
    """What a run reads: directories and files (symlinks are followed when compared with OUT)."""

    dirs: Sequence[Path] = ()
    files: Sequence[Path] = ()
    confirm: Callable[[], None] | None = None  # checks of the inputs still running: raises what they found


def check_not_input(out: Path, inputs: Inputs) -> None:
    """Refuse an OUT that is an input, lies inside an input directory, or holds an input (even with --force)."""
    o = Path(out).resolve()
    for d in inputs.dirs:
        r = Path(d).resolve()
        if o == r or r in o.parents or o in r.parents:
            how = "is" if o == r else ("is inside" if r in o.parents else "holds")
            raise OutputError(
                f"{out} {how} the input directory {d}; qmerge never writes over its inputs, not even with "
                "--force. Choose another output path."
            )
    for f in inputs.files:
        r = Path(f).resolve()
        if o == r or o in r.parents:
            how = "is" if o == r else "holds"
            raise OutputError(
                f"{out} {how} the input file {f}; qmerge never writes over its inputs, not even with "
                "--force. Choose another output path."
            )


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `.OUT.qmerge-lock` for the block; a second run on the same OUT fails at once and leaves the
    lock alone. The lock file is removed only by its holder (while it still holds it), and a lock taken on
    a file that its holder removed meanwhile is taken again on the new one, so that a third run can never
    get past a held lock."""
    lock = _sibling(out, "lock")
    for _attempt in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise _translate(e, out) from e
        try:
            _flock(fd, out)
            held = os.fstat(fd)
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is not None and same_file(held, current):
                break  # this file is the lock: ours until we remove it
        except BaseException:
            os.close(fd)  # refused (or interrupted): the lock is the other run's, left as it is
            raise
        os.close(fd)  # its holder removed the file we locked before we got it: lock the new one
    else:
        raise OutputError(
            f"{out}: cannot take the output lock {lock.name}; another qmerge run keeps replacing it."
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            if same_file(os.fstat(fd), os.stat(lock)):
                lock.unlink()  # while still held: a run waiting on this file then sees it gone
        except OSError:
            pass
        finally:
            os.close(fd)


def _flock(fd: int, out: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the lock file's existence is the lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise OutputError(
            f"{out}: another qmerge run is writing this output now. Wait for it, or choose another path."
        ) from e


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.qmerge-(?:tmp|old)-(?P<pid>\d+)(?:\..*)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier run that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the temporaries that killed runs left beside OUT (their process is gone); returns them."""
    parent = out.parent if str(out.parent) else Path(".")
    removed = []
    for p in parent.iterdir() if parent.is_dir() else ():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])):
            _remove(p)
            removed.append(p)
    return removed


def check_target(out: Path, force: bool, owned: Ownership | None) -> os.stat_result | None:
    """Refuse an `out` that exists without `force`, or that `owned` says qmerge did not write; returns what
    is there now (None: nothing), which the commit requires to be unchanged."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: the directory for the output does not exist. Create it first.")
    try:
        found = os.lstat(out)
    except FileNotFoundError:
        return None
    if not force:
        raise OutputError(f"{out} already exists; pass --force to replace it, or choose another path.")
    why = (
        "it is a symbolic link"
        if out.is_symlink()
        else (owned(out) if owned else "qmerge cannot tell who wrote it")
    )
    if why:
        raise OutputError(
            f"{out} exists and --force replaces only outputs qmerge wrote: {why}. Choose another path."
        )
    return found


def check_output(
    out: Path, force: bool = False, inputs: Inputs = Inputs(), owned: Ownership | None = None
) -> None:
    """The checks `atomic_output` makes before it writes, for a caller that writes `out` only after long
    work (check's --report): refuse now rather than after it."""
    check_not_input(Path(out), inputs)
    check_target(Path(out), force, owned)


def _sync(tmp: Path) -> None:
    """fsync every file of the output before the rename, so that a renamed output is on the disk: the
    streaming writers sync their own files (a no-op here), llama.cpp's quantizer and gguf-py's writer do not."""
    for p in [tmp] if tmp.is_file() else sorted(q for q in tmp.rglob("*") if q.is_file()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _translate(e: OSError, where: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(
            f"{where}: disk full while writing the output; nothing was left behind. Free space and retry."
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(
            f"{where}: cannot write there ({e.strerror}). Choose a directory you can write to."
        )
    return OutputError(f"{where}: cannot write the output ({e.strerror or e}).")


@contextmanager
def atomic_output(
    out: Path,
    kind: str,
    force: bool = False,
    inputs: Inputs = Inputs(),
    owned: Ownership | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling ("dir": created; "file": a path) and rename it to `out` when the block
    completes; on any failure or interrupt remove it (and anything named after it) and leave `out` as it was.

    Refused before anything is written: an `out` that touches an input; an existing `out` without `force`,
    or one `owned` says qmerge did not write; a second run on the same `out` at the same time. Refused at the
    end, with `out` untouched: an `out` that is no longer what it was at the start (something appeared or
    replaced the qmerge output there), and whatever `inputs.confirm` raises (checks still running).
    """
    out = Path(out)
    check_not_input(out, inputs)
    with _locked(out):
        remove_leftovers(out)
        before = check_target(out, force, owned)
        tmp = _sibling(out, f"tmp-{os.getpid()}")
        try:
            if kind == "dir":
                tmp.mkdir()
            yield tmp
            if inputs.confirm is not None:
                inputs.confirm()
            _sync(tmp)
            commit(tmp, out, before, owned)
        except OSError as e:
            raise _translate(e, out) from e
        finally:
            for p in [tmp, *tmp.parent.glob(glob.escape(tmp.name) + ".*")]:
                _remove(p)


def atomic_dir(out: Path, force: bool = False, inputs: Inputs = Inputs(), owned: Ownership | None = None):
    return atomic_output(out, "dir", force, inputs, owned)


def atomic_file(out: Path, force: bool = False, inputs: Inputs = Inputs(), owned: Ownership | None = None):
    return atomic_output(out, "file", force, inputs, owned)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path, known: dict[str, str] | None = None) -> list[OutputFile]:
    """OutputFile records for every file under root (a file or a directory), with sha256.

    `known` maps relative paths to sha256 digests already computed while writing (not read again).
    """
    root = Path(root)
    known = known or {}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for p in files:
        rel = p.name if root.is_file() else str(p.relative_to(root))
        out.append(OutputFile(rel, p.stat().st_size, known.get(rel) or sha256_file(p)))
    return out
