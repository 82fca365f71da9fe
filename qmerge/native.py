"""Keep C libraries' chatter (llama.cpp logs to file descriptor 2) off the user's terminal."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Redirect fd 2 to /dev/null for the block, unless QMERGE_DEBUG is set."""
    if os.environ.get("QMERGE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
