"""What a path given to qmerge is: a GGUF file, a PEFT adapter, or a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .files import open_regular

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with open_regular(path) as f:
        return f.read(4) == GGUF_MAGIC


def path_kind(path: Path) -> tuple[str, Path]:
    """("gguf" | "adapter" | "model", the file or directory to read). A directory with neither config is
    an "adapter", whose reader says what is missing (or which trainer checkpoint to pass)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory.")
    if path.is_file() or not path.is_dir():
        if is_gguf(path):
            return "gguf", path
        if path.name in ("adapter_config.json", "adapter_model.safetensors"):
            return "adapter", path.parent
        if path.name == "config.json":
            return "model", path.parent
        raise InputError(f"{path}: not a GGUF file, an adapter or a model directory.")
    if (path / "adapter_config.json").exists() or not (path / "config.json").exists():
        return "adapter", path
    return "model", path
