"""Opening input files safely: regular files only (a FIFO or device named like a model file must not
hang or flood qmerge), JSON read with a size bound and one clear message per failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

MAX_JSON_BYTES = 64 * 2**20  # configs, indexes and records are kilobytes; a larger one is not ours to read


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading in binary, refusing anything but a regular file (without blocking on a FIFO)."""
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found.") from e
    except IsADirectoryError as e:
        raise InputError(f"{path}: is a directory, expected a file.") from e
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror or e}).") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(
                f"{path}: not a regular file (a FIFO, device or socket); qmerge reads only files."
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a clear InputError."""
    with open_regular(path) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB; not a config qmerge reads.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e}). Fix or regenerate the file.") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object.")
    return data
