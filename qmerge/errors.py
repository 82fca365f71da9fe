"""One exception hierarchy. The library raises these; only the CLI prints or exits."""


class QmergeError(Exception):
    """A clear, user-facing error: what is wrong, where, and what to do."""


class InputError(QmergeError):
    """A file or directory is missing, corrupt, or not what the command needs."""


class MismatchError(QmergeError):
    """Two inputs do not belong together (an adapter for another base, a shape mismatch)."""


class UnsupportedError(QmergeError):
    """A valid input that qmerge does not handle (an architecture, an adapter type, a GGUF type)."""


class OutputError(QmergeError):
    """The output cannot be written (exists without --force, disk full, permissions)."""


class DependencyError(QmergeError):
    """An optional dependency that this operation needs is not installed."""


class OptionError(QmergeError):
    """A setting out of its range or in a combination that does not apply (the CLI's usage errors, through
    the Python API)."""
