"""qmerge: take a QLoRA fine-tune from training to deployment without losing what it learned, and prove it.

The verbs: `merge` (an adapter into the weights its training saw, as a Hugging Face model directory),
`export` (to bf16/fp16/fp32, NF4, GGUF or a LoRA GGUF), `check` (a candidate against the unmerged QLoRA
model, with thresholds) and `describe` (a base, adapter, merged model or GGUF, without loading a model).
Each returns a frozen report and raises a QmergeError (qmerge.errors) with one readable message. Importing
qmerge costs no torch: the pipelines are imported when a verb runs.

The verbs are imported on first use (PEP 562), so that the command line's entry point, `qmerge.__main__`,
takes Ctrl-C within a few milliseconds of its start, before any library is imported.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["merge", "export", "check", "describe", "QmergeError", "__version__"]

_HOME = {"merge": ".api", "export": ".api", "check": ".api", "describe": ".api", "QmergeError": ".errors"}

if TYPE_CHECKING:
    from .api import check, describe, export, merge
    from .errors import QmergeError


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
