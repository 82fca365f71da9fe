"""How training quantized the base, established from the evidence there is and never silently assumed: the
--quant-* options, qmerge's training record, the 4-bit checkpoint itself, or the 4-bit checkpoint the
adapter names as its base (even when --base points at the 16-bit original); where there is none, the QLoRA
settings are assumed and the run says so (with the common alternative: transformers' bare
BitsAndBytesConfig(load_in_4bit=True) trains on FP4 without double quantization)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import dtypes
from ..errors import InputError, QmergeError
from ..io.adapter import Adapter
from ..io.hf_dir import ModelDir
from ..io.records import TRAINING_RECORD, read_training_quantization
from ..quant.codebooks import BLOCKSIZES_4BIT
from .base import QuantSettings
from .identity import find_named, label

ASSUMED = (
    "nothing says how training quantized the 16-bit base (no --quant-* options, no qmerge_training.json, and "
    "the adapter's base_model_name_or_path is not a 4-bit checkpoint here), so qmerge assumed QLoRA's NF4 "
    "with double quantization, blocksize 64. If training loaded the base with transformers' bare "
    "BitsAndBytesConfig(load_in_4bit=True), it used FP4 without double quantization: pass --quant-type fp4 "
    "--no-double-quant."
)


@dataclass(frozen=True)
class Quantization:
    """The settings the base's 4-bit weights are read or reproduced with, and where they come from:
    "option", "training record", "checkpoint", "named base" or "assumed" (`origin` says which file)."""

    settings: QuantSettings
    source: str
    origin: str = ""
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of_checkpoint(cls, base: ModelDir) -> Quantization:
        return cls(_checkpoint_settings(base), "checkpoint", base.path.name)

    def to_json(self) -> dict:
        q = self.settings
        return {
            "quant_type": q.quant_type,
            "blocksize": q.blocksize,
            "double_quant": q.double_quant,
            "dtype": dtypes.config_name(q.dtype) if q.dtype is not None else None,
            "source": self.source,
            "from": self.origin,
        }


def establish_quantization(
    adapter: Adapter | None, base: ModelDir | None, override: QuantSettings | None
) -> Quantization:
    """How training quantized `base` for `adapter` (see the module's docstring for the order); a conflict
    between two pieces of evidence is a warning that says which wins."""
    if base is not None and base.is_4bit:  # read from its quant states: no option or record changes them
        return Quantization.of_checkpoint(base)
    record = _record_settings(adapter) if adapter is not None else None
    named = _named_base_settings(adapter, base) if adapter is not None else None
    if override is not None:
        warnings = [
            f"the --quant-* options ({_describe(override)}) differ from {where} ({_describe(q)}); the options win."
            for q, where in (e for e in (record, named) if e is not None)
            if not _same(q, override)
        ]
        return Quantization(override, "option", "--quant-* options", warnings)
    if record is not None:
        disagree = named is not None and not _same(named[0], record[0])
        warnings = (
            [
                f"{record[1]} ({_describe(record[0])}) and {named[1]} ({_describe(named[0])}) disagree; the record wins."
            ]
            if disagree
            else []
        )
        return Quantization(record[0], "training record", record[1], warnings)
    if named is not None:
        return Quantization(named[0], "named base", named[1])
    return Quantization(QuantSettings(), "assumed", "", [ASSUMED] if adapter is not None else [])


def _describe(q: QuantSettings) -> str:
    return (
        f"{q.quant_type}, {'double quant' if q.double_quant else 'no double quant'}, blocksize {q.blocksize}"
    )


def _same(a: QuantSettings, b: QuantSettings) -> bool:
    return (a.quant_type, a.blocksize, a.double_quant) == (b.quant_type, b.blocksize, b.double_quant)


def _checkpoint_settings(base: ModelDir) -> QuantSettings:
    """The settings a bitsandbytes 4-bit checkpoint was saved with (its first 4-bit weight's state)."""
    e = next(iter(base.quantized.values()))
    return QuantSettings(e.quant_type, e.blocksize, e.nested_offset is not None, e.dtype)


def _named_base_settings(adapter: Adapter, base: ModelDir | None) -> tuple[QuantSettings, str] | None:
    """The settings of the base the adapter names, where that is a 4-bit checkpoint found here (a directory
    as named or beside the adapter, or a Hub id in the local cache) other than `base`."""
    named = adapter.base_model_name_or_path
    if not named:
        return None
    found = find_named(adapter, named)
    if found is None or (base is not None and found.resolve() == base.path.resolve()):
        return None
    try:
        model = ModelDir(found)
    except QmergeError:
        return None  # not a model directory qmerge reads: the evidence is missing, not wrong
    if not model.is_4bit:
        return None
    return _checkpoint_settings(
        model
    ), f"the adapter's named base {label(adapter, named)} (a 4-bit checkpoint)"


def _record_settings(adapter: Adapter) -> tuple[QuantSettings, str] | None:
    """The settings qmerge's training record (qmerge_training.json) gives, checked."""
    rec = read_training_quantization(adapter.path) if adapter is not None else None
    if not rec:
        return None
    where = f"{adapter.path}/qmerge_training.json"
    dtype = dtypes.config_dtype(rec["dtype"]) if rec.get("dtype") else None
    if rec.get("dtype") and dtype is None:
        raise InputError(f"{where}: quantization dtype {rec['dtype']!r} is not float32, float16 or bfloat16.")
    storage = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if rec.get("quant_storage", "uint8") not in storage:
        raise InputError(f"{where}: quant_storage {rec['quant_storage']!r} is not uint8, bf16, fp16 or fp32.")
    settings = QuantSettings(
        quant_type=rec.get("quant_type", "nf4"),
        blocksize=rec.get("blocksize", 64),
        double_quant=rec.get("double_quant", True),
        dtype=dtype,
        storage=storage[rec.get("quant_storage", "uint8")],
    )
    if settings.quant_type not in ("nf4", "fp4") or settings.blocksize not in BLOCKSIZES_4BIT:
        raise InputError(f"{where}: quantization {rec} is not one bitsandbytes makes.")
    return settings, f"the adapter's {TRAINING_RECORD}"  # no local path: it goes into the provenance
