"""`qmerge` and `python -m qmerge`: the command line, with Ctrl-C honoured from the first instant.

The console script starts here rather than in cli.py so that an interrupt while cli.py and its libraries
are still importing ends with the same one-line message and exit code as any other interrupt: until cli.py
takes over, SIGINT and SIGTERM are only noted (an interrupt inside a C extension's import can leave the
library half-initialised or abort the process), and the run stops right after the import.
"""

import signal
import sys

_noted: list[int] = []


def _note(signum, frame) -> None:
    _noted.append(signum)


def main() -> None:
    for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if s is not None:
            signal.signal(s, _note)
    from .cli import main as run

    if _noted:
        sys.stderr.write("qmerge: error: interrupted; nothing was written.\n")
        sys.exit(128 + _noted[0])
    run()


if __name__ == "__main__":
    main()
