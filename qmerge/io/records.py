"""qmerge's own records, one schema each: qmerge_training.json (written by `qmerge train` into every
checkpoint: how the base was quantized) and qmerge_provenance.json (written into every output: what went
into it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import __version__
from ..errors import InputError
from .atomic import sha256_file
from .files import read_json
from .safetensors import read_header

TRAINING_RECORD = "qmerge_training.json"
PROVENANCE = "qmerge_provenance.json"


def write_json(path: Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def training_record(base: Path, quantization: dict, config: dict) -> dict:
    """The record `qmerge train` writes: the base and how training quantized it."""
    return {
        "qmerge_version": __version__,
        "base": str(Path(base).resolve()),
        "quantization": quantization,
        "config": config,
    }


def read_training_quantization(adapter_dir: Path) -> dict | None:
    """The "quantization" object of an adapter's training record (checked), or None without a record."""
    path = Path(adapter_dir) / TRAINING_RECORD
    if not path.exists():
        return None
    rec = read_json(path).get("quantization", {})
    if not isinstance(rec, dict):
        raise InputError(f"{path}: 'quantization' is not an object. Remove the file or fix it.")
    return rec


def _header_sha(path: Path) -> str:
    """sha256 of a safetensors file's tensor table (names, dtypes, shapes, offsets): hashing a multi-GB
    base would cost more than the merge."""
    if path.suffix != ".safetensors":
        return ""
    infos, _ = read_header(path)
    blob = json.dumps({k: [v.dtype, v.shape, v.start, v.end] for k, v in infos.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def provenance(base_dir: Path, base_files: list[Path], adapter_dir: Path | None, settings: dict) -> dict:
    """What went into an output: qmerge version, the inputs (base by size and header hash, adapter files by
    sha256), and the settings."""
    inputs: dict = {
        "base": {
            "path": str(Path(base_dir).resolve()),
            "files": [
                {"name": f.name, "bytes": f.stat().st_size, "header_sha256": _header_sha(f)}
                for f in base_files
            ],
        }
    }
    if adapter_dir is not None:
        inputs["adapter"] = {
            "path": str(Path(adapter_dir).resolve()),
            "files": [
                {"path": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
                for f in sorted(Path(adapter_dir).iterdir())
                if f.name.startswith("adapter_") and f.is_file()
            ],
        }
    return {"qmerge_version": __version__, "inputs": inputs, "settings": settings}


def read_provenance(output_dir: Path) -> dict | None:
    """The provenance record of a qmerge output directory, or None for a directory qmerge did not write."""
    path = Path(output_dir) / PROVENANCE
    return read_json(path) if path.is_file() else None
