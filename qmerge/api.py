"""The public verbs: merge, export, check, describe. Each opens its inputs, runs one pipeline, and returns
a frozen report; nothing here prints or exits (CONTRACT.md describes the command line around them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import dtypes
from .errors import UnsupportedError
from .formats.gguf import CALIBRATED_TYPES, OWN_CALIBRATED_TYPES, TensorTypes, takes_tensor_types, write_gguf
from .formats.nf4 import NF4, NF4Options
from .formats.plain import Plain
from .formats.write import DEFAULT_MAX_SHARD, write_model_dir
from .pipeline.base import QuantSettings
from .pipeline.source import Source, open_checkpoint, open_source
from .pipeline.stream import Progress
from .reports import WriteReport

FORMATS = (*dtypes.OPTION_NAMES, "nf4", "gguf", "gguf-lora")


def merge(
    adapter: Path,
    out: Path,
    base: Path | None = None,
    dtype: str = "bf16",
    merge_base: str = "dequantized",
    quant: QuantSettings | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    allow_other_base: bool = False,
) -> WriteReport:
    """Merge a QLoRA adapter into the weights its training saw and write a Hugging Face model directory.
    A base that is another model than the one the adapter names (when that one is here) is refused unless
    allow_other_base."""
    fmt = Plain(dtypes.option_dtype(dtype))  # a bad dtype is refused before anything is opened
    source = open_checkpoint(
        Path(adapter), Path(base) if base else None, quant, merge_base, allow_pickle, True, allow_other_base
    )
    return finished(write_model_dir(source, fmt, Path(out), max_shard_size, force, progress), source)


CALIBRATES = (
    "--calibrate applies to --to nf4, and to --to gguf / gguf-lora with --gguf-type "
    f"{', '.join(CALIBRATED_TYPES)}."
)


IMATRIX = "--imatrix writes the importance matrix of a calibrated GGUF export: use it with --to gguf and --calibrate."


TENSOR_TYPES = (
    "--gguf-embedding-type / --gguf-output-type apply where llama.cpp's quantizer writes the file: --to gguf or "
    f"gguf-lora with a --gguf-type llama.cpp quantizes (not f32, f16, bf16, q8_0; nor {', '.join(OWN_CALIBRATED_TYPES)} "
    "with --calibrate, which qmerge writes itself)."
)


KEEP_DELTA = "--keep-delta applies to a calibrated GGUF of an adapter: --to gguf --calibrate DATA."


def calibrates(to: str, gguf_type: str) -> bool:
    """Whether an export to `to` (with `gguf_type`) can choose its codes on calibration data."""
    return to == "nf4" or (to in ("gguf", "gguf-lora") and gguf_type.lower() in CALIBRATED_TYPES)


def option_conflict(
    to: str,
    gguf_type: str,
    calibrate,
    imatrix=None,
    tensor_types: TensorTypes = TensorTypes(),
    keep_delta: float | None = None,
) -> str | None:
    """What is wrong with this combination of export options (the CLI's usage error, the API's
    UnsupportedError), or None."""
    gguf_calibrated = to == "gguf" and calibrate is not None
    if calibrate is not None and not calibrates(to, gguf_type):
        return CALIBRATES
    if tensor_types and not takes_tensor_types(to, gguf_type, calibrate is not None):
        return TENSOR_TYPES
    if keep_delta is not None and not gguf_calibrated:
        return KEEP_DELTA
    if imatrix is not None and not gguf_calibrated:
        return IMATRIX
    return None


def export(
    source: Path,
    to: str,
    out: Path,
    base: Path | None = None,
    gguf_type: str = "f16",
    merge_base: str = "dequantized",
    quant: QuantSettings | None = None,
    nf4: NF4Options = NF4Options(),
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
    calibrate: Path | None = None,
    calibration_tokens: int = 8192,
    imatrix: Path | None = None,
    tensor_types: TensorTypes = TensorTypes(),
    keep_delta: float | None = None,
    allow_other_base: bool = False,
) -> WriteReport:
    """Export SOURCE (a QLoRA checkpoint, merged on the fly, or a model directory) to one format. With
    `calibrate` (JSONL or text), an NF4 export, a GGUF of a type llama.cpp quantizes or a gguf-lora export's
    base chooses the codes of the layers 4-bit in training on that data (error feedback, or llama.cpp's
    importance matrix); a calibrated GGUF export can also write that importance matrix at `imatrix`."""
    if to not in FORMATS:
        raise UnsupportedError(f"unknown export format {to!r}: choose one of {', '.join(FORMATS)}.")
    if to in ("gguf", "gguf-lora"):
        from .formats.gguf import check_type

        check_type(gguf_type)
    conflict = option_conflict(to, gguf_type, calibrate, imatrix, tensor_types, keep_delta)
    if conflict:
        raise UnsupportedError(conflict)
    if imatrix is not None and Path(imatrix).resolve() == Path(out).resolve():
        raise UnsupportedError(f"{imatrix}: --imatrix names the output file itself; give it its own path.")
    # the config check runs in the background unless calibration builds the model with transformers anyway
    background = calibrate is None
    src = open_source(
        Path(source),
        Path(base) if base else None,
        quant,
        merge_base,
        allow_pickle,
        background,
        allow_other_base,
    )
    if keep_delta is not None and src.adapter is None:
        raise UnsupportedError(
            f"{source}: {KEEP_DELTA} This is a model directory: there is no delta to keep."
        )
    report = _write(
        src,
        to,
        Path(out),
        gguf_type,
        nf4,
        max_shard_size,
        force,
        progress,
        calibrate,
        calibration_tokens,
        imatrix,
        tensor_types,
        keep_delta,
    )
    return finished(report, src)


def finished(report: WriteReport, source: Source) -> WriteReport:
    """The report with what the source established on the way: warnings, and how the base was quantized
    (null where no 4-bit weights were read or reproduced)."""
    four_bit = source.quantization is not None and (source.base.is_4bit or source.merge_base == "dequantized")
    q = source.quantization.to_json() if four_bit else None
    return replace(report, warnings=[*report.warnings, *source.warnings], quantization=q)


def _write(
    src: Source,
    to: str,
    out: Path,
    gguf_type: str,
    nf4: NF4Options,
    max_shard_size: int | str,
    force: bool,
    progress: Progress | None,
    calibrate: Path | None,
    calibration_tokens: int,
    imatrix: Path | None,
    tensor_types: TensorTypes,
    keep_delta: float | None,
) -> WriteReport:
    """The writer of format `to` for export()."""
    if to == "gguf" and calibrate is not None:
        from .formats.gguf_calibrated import write_calibrated_gguf

        return write_calibrated_gguf(
            src,
            Path(out),
            gguf_type.lower(),
            Path(calibrate),
            calibration_tokens,
            force,
            progress,
            imatrix,
            tensor_types,
            keep_delta,
        )
    if to == "gguf":
        return write_gguf(src, Path(out), gguf_type, force, progress, tensor_types)
    if to == "gguf-lora":
        if src.adapter is None:
            raise UnsupportedError(
                f"{src.base.path}: --to gguf-lora exports an adapter; this is a model directory."
            )
        from .formats.gguf_lora import write_gguf_lora

        return write_gguf_lora(
            src, Path(out), gguf_type.lower(), force, progress, calibrate, calibration_tokens, tensor_types
        )
    if calibrate is not None:
        from .formats.nf4_calibrated import write_calibrated_nf4

        return write_calibrated_nf4(
            src, Path(out), Path(calibrate), nf4, calibration_tokens, max_shard_size, force, progress
        )
    fmt = NF4(nf4) if to == "nf4" else Plain(dtypes.option_dtype(to), {"export": to})
    return write_model_dir(src, fmt, Path(out), max_shard_size, force, progress)


def check(*args, **kwargs):
    """Compare a candidate with the unmerged QLoRA model (see verify.check.check)."""
    from .verify.check import check as run

    return run(*args, **kwargs)


def describe(*args, **kwargs):
    """Describe a base, adapter, merged model or GGUF file (see describe.describe)."""
    from .describe import describe as run

    return run(*args, **kwargs)
