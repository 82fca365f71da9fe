"""The export formats in one table (name, what it writes, the options it takes) that the command line's
choices, the API's checks and the option-conflict rules all read; the option types they take; and
write_format, which hands a source to its format's writer. A new format touches its writer, the table and
write_format. Torch-free at import (writers are imported when one runs), so that usage errors answer at
once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnsupportedError
from ..names import DTYPES, GGUF_LLAMA_CPP_TYPES, GGUF_OWN_CALIBRATED_TYPES

if TYPE_CHECKING:
    from ..pipeline.source import Source
    from ..pipeline.stream import Progress
    from ..reports import WriteReport

DEFAULT_MAX_SHARD = 5 * 1000**3  # bytes per safetensors shard (transformers' default)


@dataclass(frozen=True)
class NF4Options:
    """How to requantize: blocksize, double quant, and the dtype the layers compute (and store scales) in."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_type: str = "nf4"


@dataclass(frozen=True)
class TensorTypes:
    """Types llama.cpp's quantizer gives the token embedding and the output layer instead of its own rule's
    (None: its rule's)."""

    token_embedding: str | None = None
    output: str | None = None

    def __bool__(self) -> bool:
        return bool(self.token_embedding or self.output)


@dataclass(frozen=True)
class Format:
    """One export format: what it writes and the export options it takes (beyond source, base, output)."""

    name: str
    writes: str
    takes: frozenset[str]


_PLAIN = frozenset({"max_shard_size", "check_report"})
FORMATS: dict[str, Format] = {
    **{d: Format(d, f"a Hugging Face model directory in {d}", _PLAIN) for d in DTYPES},
    "nf4": Format(
        "nf4",
        "a bitsandbytes 4-bit model directory transformers loads",
        frozenset({"max_shard_size", "nf4", "calibrate", "calibration_tokens", "check_report"}),
    ),
    "gguf": Format(
        "gguf",
        "a GGUF file llama.cpp loads",
        frozenset(
            {
                "gguf_type",
                "calibrate",
                "calibration_tokens",
                "imatrix",
                "tensor_types",
                "keep_delta",
                "name",
                "modelfile",
                "mmproj",
            }
        ),
    ),
    "gguf-lora": Format(
        "gguf-lora",
        "a directory: the adapter as a llama.cpp LoRA GGUF, its base as a GGUF, an Ollama Modelfile",
        frozenset({"gguf_type", "calibrate", "calibration_tokens", "tensor_types", "name"}),
    ),
}
EXPORT_FORMATS = tuple(FORMATS)
CALIBRATED_TYPES = GGUF_LLAMA_CPP_TYPES  # the GGUF types --calibrate applies to

# How messages name the options: as the command line spells them, or as the API's keywords.
CLI_NAMES = {
    "to": "--to",
    "gguf_type": "--gguf-type",
    "calibrate": "--calibrate",
    "imatrix": "--imatrix",
    "tensor_types": "--gguf-embedding-type / --gguf-output-type",
    "keep_delta": "--keep-delta",
    "name": "--name",
    "modelfile": "--modelfile",
    "mmproj": "--mmproj",
    "check_report": "--check-report",
}
API_NAMES = {k: k for k in CLI_NAMES} | {"tensor_types": "tensor_types"}


def calibrates(to: str, gguf_type: str) -> bool:
    """Whether an export to `to` (with `gguf_type`) can choose its codes on calibration data."""
    takes = "calibrate" in FORMATS[to].takes if to in FORMATS else False
    return takes and (to == "nf4" or gguf_type.lower() in CALIBRATED_TYPES)


def takes_tensor_types(to: str, gguf_type: str, calibrated: bool) -> bool:
    """Whether llama.cpp's quantizer writes the GGUF of this export (so TensorTypes apply)."""
    t = gguf_type.lower()
    return (
        to in FORMATS
        and "tensor_types" in FORMATS[to].takes
        and t in GGUF_LLAMA_CPP_TYPES
        and not (calibrated and t in GGUF_OWN_CALIBRATED_TYPES)
    )


def option_conflict(
    to: str,
    gguf_type: str,
    calibrate=None,
    imatrix=None,
    tensor_types: TensorTypes | None = None,
    keep_delta: float | None = None,
    names: dict[str, str] = API_NAMES,
    name: str | None = None,
    modelfile=None,
    check_report=None,
    mmproj=None,
) -> str | None:
    """What is wrong with this combination of export options, named as `names` spells them (CLI_NAMES for the
    command line's usage error, API_NAMES for the API's UnsupportedError), or None."""
    n = names
    to_gguf = f"{n['to']} gguf"
    if to not in FORMATS:
        return f"unknown export format {to!r}: choose one of {', '.join(EXPORT_FORMATS)}."
    if calibrate is not None and not calibrates(to, gguf_type):
        return (
            f"{n['calibrate']} applies to {n['to']} nf4, and to {to_gguf} / gguf-lora with {n['gguf_type']} "
            f"{', '.join(CALIBRATED_TYPES)}."
        )
    if tensor_types and not takes_tensor_types(to, gguf_type, calibrate is not None):
        return (
            f"{n['tensor_types']} apply where llama.cpp's quantizer writes the file: {to_gguf} or gguf-lora with "
            f"a {n['gguf_type']} llama.cpp quantizes (not f32, f16, bf16, q8_0; nor "
            f"{', '.join(GGUF_OWN_CALIBRATED_TYPES)} with {n['calibrate']}, which qmerge writes itself)."
        )
    if check_report is not None and "check_report" not in FORMATS[to].takes:
        return (
            f"{n['check_report']} puts a check's figures in a model directory's card: it applies to "
            f"{n['to']} {', '.join(f for f in EXPORT_FORMATS if 'check_report' in FORMATS[f].takes)}."
        )
    if mmproj is not None and "mmproj" not in FORMATS[to].takes:
        return f"{n['mmproj']} writes a vision model's projector beside the GGUF: it applies to {to_gguf}."
    return _gguf_conflict(to, calibrate, imatrix, keep_delta, n, name, modelfile)


def _gguf_conflict(to, calibrate, imatrix, keep_delta, n: dict[str, str], name, modelfile) -> str | None:
    """The options only a GGUF export takes, given elsewhere (option_conflict's second half)."""
    to_gguf = f"{n['to']} gguf"
    if name is not None and "name" not in FORMATS[to].takes:
        return f"{n['name']} names the model in a GGUF's metadata: it applies to {to_gguf} and gguf-lora."
    if name is not None and not name.strip():
        return f"{n['name']} must not be empty."
    if modelfile is not None and "modelfile" not in FORMATS[to].takes:
        return (
            f"{n['modelfile']} writes an Ollama Modelfile for {to_gguf} (gguf-lora writes its own in its "
            "directory)."
        )
    calibrated_gguf = to == "gguf" and calibrate is not None
    if keep_delta is not None and not calibrated_gguf:
        return (
            f"{n['keep_delta']} applies to a calibrated GGUF of an adapter: {to_gguf} {n['calibrate']} DATA."
        )
    if imatrix is not None and not calibrated_gguf:
        return (
            f"{n['imatrix']} writes the importance matrix of a calibrated GGUF export: use it with {to_gguf} "
            f"and {n['calibrate']}."
        )
    return None


@dataclass(frozen=True)
class Job:
    """One export's options, as export() checked them (FORMATS says which each format reads)."""

    to: str
    out: Path
    gguf_type: str = "f16"
    nf4: NF4Options = NF4Options()
    max_shard_size: int | str = DEFAULT_MAX_SHARD
    force: bool = False
    progress: Progress | None = None
    calibrate: Path | None = None
    calibration_tokens: int = 8192
    imatrix: Path | None = None
    tensor_types: TensorTypes = TensorTypes()
    keep_delta: float | None = None
    modelfile: Path | None = None  # gguf: an Ollama Modelfile for the file, written once it is in place
    mmproj: Path | None = None  # gguf: a vision-language model's projector GGUF, written after the file


def write_format(src: Source, job: Job) -> WriteReport:
    """Write `src` with the writer of `job.to`."""
    if job.to == "gguf":
        return _gguf(src, job)
    if job.to == "gguf-lora":
        if src.adapter is None:
            raise UnsupportedError(
                f"{src.base.path}: the gguf-lora format exports an adapter; this is a model directory."
            )
        from .gguf_lora import write_gguf_lora

        j = job
        return write_gguf_lora(
            src,
            j.out,
            j.gguf_type.lower(),
            j.force,
            j.progress,
            j.calibrate,
            j.calibration_tokens,
            j.tensor_types,
        )
    return _model_dir(src, job)


def _gguf(src: Source, j: Job) -> WriteReport:
    from dataclasses import replace

    from .modelfile import check_modelfile_target, modelfile_beside

    if j.modelfile is not None:  # refused now, not after the export
        check_modelfile_target(j.modelfile, j.force, src.inputs())
    vision = None
    if j.mmproj is not None:
        from ..io.atomic import check_output
        from ..io.gguf.writer import not_written_by_qmerge
        from .mmproj import Mmproj, write_mmproj

        check_output(Path(j.mmproj), j.force, src.inputs(), not_written_by_qmerge)  # a GGUF qmerge wrote
        vision = Mmproj(src, j.gguf_type.lower())  # one qmerge does not write: refused before any work
    report = _gguf_file(src, j)
    if vision is not None:
        record, said = write_mmproj(src, vision, j.mmproj, j.force, j.progress)
        report = replace(report, files=[*report.files, record], details={**report.details, "mmproj": said})
    if j.modelfile is None:
        return report
    record, chat = modelfile_beside(
        Path(report.output), j.modelfile, src.tokenizer_dir, j.force, src.inputs()
    )
    if not chat["translated"]:
        src.warnings.append(f"{j.modelfile}: no TEMPLATE: {chat['reason']}.")
    return replace(report, files=[*report.files, record], details={**report.details, "modelfile": chat})


def _gguf_file(src: Source, j: Job) -> WriteReport:
    if j.calibrate is None:
        from .gguf import write_gguf

        return write_gguf(src, j.out, j.gguf_type, j.force, j.progress, j.tensor_types)
    from .gguf_calibrated import write_calibrated_gguf

    return write_calibrated_gguf(
        src,
        j.out,
        j.gguf_type.lower(),
        j.calibrate,
        j.calibration_tokens,
        j.force,
        j.progress,
        j.imatrix,
        j.tensor_types,
        j.keep_delta,
    )


def _model_dir(src: Source, j: Job) -> WriteReport:
    """bf16/fp16/fp32 and NF4 (calibrated or not): a Hugging Face model directory."""
    if j.calibrate is not None:
        from .nf4_calibrated import write_calibrated_nf4

        return write_calibrated_nf4(
            src, j.out, j.calibrate, j.nf4, j.calibration_tokens, j.max_shard_size, j.force, j.progress
        )
    from .. import dtypes
    from .nf4 import NF4
    from .plain import Plain
    from .write import write_model_dir

    fmt = NF4(j.nf4) if j.to == "nf4" else Plain(dtypes.option_dtype(j.to), {"export": j.to})
    return write_model_dir(src, fmt, j.out, j.max_shard_size, j.force, j.progress)


def separate_paths(out, imatrix, modelfile, mmproj=None) -> None:
    """The importance matrix, the Modelfile and the projector each get a path of their own, apart from the
    output."""
    paths = [
        ("the output file", out),
        ("the importance matrix", imatrix),
        ("the Modelfile", modelfile),
        ("the vision projector", mmproj),
    ]
    seen: dict[Path, str] = {}
    for what, p in paths:
        if p is None:
            continue
        key = Path(p).resolve()
        if key in seen:
            raise UnsupportedError(f"{p}: {what} would be {seen[key]} itself; give each its own path.")
        seen[key] = what
