"""qmerge's own records, one schema each: qmerge_training.json (written by `qmerge train` into every
checkpoint: how the base was quantized) and qmerge_provenance.json (written into every output: what went
into it)."""

from __future__ import annotations

import hashlib
import json
import re
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


# A directory inside a Hugging Face cache: .../models--ORG--NAME/snapshots/REVISION
_HUB_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<revision>[0-9a-f]{7,64})$")


def identify(directory: Path) -> dict:
    """What identifies an input directory without saying where it lies on this machine (a provenance is
    published with the model): its name, and the Hub id and revision where it is a snapshot in a Hugging
    Face cache."""
    resolved = Path(directory).resolve()
    found: dict = {"name": resolved.name}
    m = _HUB_CACHE.search(resolved.as_posix())
    if m:
        found.update(hub_id=f"{m['org']}/{m['name']}", revision=m["revision"])
    return found


def provenance(
    base_dir: Path,
    base_files: list[Path],
    adapter_dir: Path | None,
    settings: dict,
    base_named: str | None = None,
) -> dict:
    """What went into an output: qmerge version, the inputs (base by name, Hub id and revision where known,
    size and header hash; adapter files by sha256 and the base it names; no local paths), and the settings."""
    inputs: dict = {
        "base": {
            **identify(base_dir),
            "files": [
                {"name": f.name, "bytes": f.stat().st_size, "header_sha256": _header_sha(f)}
                for f in base_files
            ],
        }
    }
    if adapter_dir is not None:
        named = base_named if base_named and not Path(base_named).is_absolute() else None
        inputs["adapter"] = {
            **identify(adapter_dir),
            **({"base_model_name_or_path": named} if named else {}),
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
