"""qmerge: take a QLoRA fine-tune from training to deployment without losing what it learned, and prove it.

The public verbs are `merge`, `export`, `check` and `describe` (qmerge.api), imported on first use so that
`import qmerge` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["merge", "export", "check", "describe", "__version__"]


def __getattr__(name: str):
    if name in ("merge", "export", "check", "describe"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qmerge' has no attribute {name!r}")
