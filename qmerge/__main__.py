"""`qmerge` and `python -m qmerge`: the command line, with Ctrl-C honoured from the first instant.

The console script starts here rather than in cli.py so that an interrupt while cli.py and its libraries
are still importing ends with the same one-line message and exit code as any other interrupt.
"""

import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("qmerge: error: interrupted; nothing was written.\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
