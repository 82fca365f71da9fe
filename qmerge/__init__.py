"""qmerge: take a QLoRA fine-tune from training to deployment without losing what it learned, and prove it.

The verbs: `merge` (an adapter into the weights its training saw, as a Hugging Face model directory),
`export` (to bf16/fp16/fp32, NF4, GGUF or a LoRA GGUF), `check` (a candidate against the unmerged QLoRA
model, with thresholds) and `describe` (a base, adapter, merged model or GGUF, without loading a model).
Each returns a frozen report and raises a QmergeError (qmerge.errors) with one readable message. Importing
qmerge costs no torch: the pipelines are imported when a verb runs.
"""

__version__ = "0.1.0"

from .api import check, describe, export, merge  # noqa: E402 - after __version__, which they import
from .errors import QmergeError  # noqa: E402

__all__ = ["merge", "export", "check", "describe", "QmergeError", "__version__"]
