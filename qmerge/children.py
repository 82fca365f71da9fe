"""Child processes qmerge starts (llama.cpp's quantizer, the background config check) end with it: a
SIGKILL of qmerge cannot stop a child from Python, so each child watches its parent and exits when the
parent is gone, and nothing it would still write outlives the run (the next run removes what it wrote)."""

from __future__ import annotations

import os
import threading
import time

PARENT_ENV = "QMERGE_PARENT_PID"
_POLL_SECONDS = 0.2


def child_env() -> dict[str, str]:
    """The environment for a child that should die with this process (see die_with_parent)."""
    return {**os.environ, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a child started with child_env(): exit at once when the parent is already gone, and from then on
    within _POLL_SECONDS of its death (a daemon thread polls; long C calls such as llama.cpp's quantizer
    release the GIL, so it runs during them)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit():
        return
    pid = int(parent)

    def orphaned() -> bool:
        return os.getppid() != pid

    if orphaned():
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="qmerge-parent-watch", daemon=True).start()
