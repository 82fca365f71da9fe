"""Atomic outputs: written beside the target and renamed into place only when complete."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError


@dataclass(frozen=True)
class OutputFile:
    """A file written by qmerge: path relative to the output, size and sha256."""

    path: str
    bytes: int
    sha256: str


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it, or choose another -o.")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: the directory for the output does not exist. Create it first.")


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.qmerge-old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def _translate(e: OSError, where: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(
            f"{where}: disk full while writing the output; nothing was left behind. Free space and retry."
        )
    return OutputError(f"{where}: cannot write the output ({e.strerror or e}).")


@contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` on success, delete it on any failure."""
    out = Path(out)
    _check_target(out, force)
    tmp = out.with_name(f".{out.name}.qmerge-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _translate(e, out) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `out` on success, delete it on any failure."""
    out = Path(out)
    _check_target(out, force)
    tmp = out.with_name(f".{out.name}.qmerge-tmp-{os.getpid()}")
    try:
        yield tmp
        _replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _translate(e, out) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
