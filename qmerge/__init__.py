"""qmerge: take a QLoRA fine-tune from training to deployment without losing what it learned."""

__version__ = "0.1.0"
