"""The public verbs: merge, export, check, describe. Each opens its inputs, runs one pipeline, and returns
a frozen report; nothing here prints or exits (the command line is built around them, docs/cli.md).

Importing this module (and `qmerge`) costs no torch: the pipelines are imported when a verb runs. Errors
are QmergeError subclasses (OptionError for an argument out of range, InputError, MismatchError,
UnsupportedError, OutputError), with messages that name keywords, not command-line options, where an
argument is at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UnsupportedError
from .formats.options import (
    DEFAULT_MAX_SHARD,
    EXPORT_FORMATS,
    FORMATS,
    Job,
    NF4Options,
    TensorTypes,
    calibrates,
    option_conflict,
    write_format,
)
from .spelling import keyword_errors

if TYPE_CHECKING:
    from .pipeline.base import QuantSettings
    from .pipeline.source import Source
    from .reports import CheckReport, Description, WriteReport
    from .verify.metrics import Thresholds

# progress(phase, done, total): called as work advances (the CLI draws it as a bar or as log lines)
Progress = Callable[[str, int, int], None]

__all__ = [
    "merge",
    "export",
    "check",
    "describe",
    "calibrates",
    "option_conflict",
    "EXPORT_FORMATS",
    "FORMATS",
    "NF4Options",
    "TensorTypes",
]


@keyword_errors
def merge(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    *,
    dtype: str = "bf16",
    merge_base: str = "dequantized",
    quant: QuantSettings | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    allow_other_base: bool = False,
    progress: Progress | None = None,
    check_report: str | Path | None = None,
) -> WriteReport:
    """Merge a QLoRA adapter into the weights its training saw and write a Hugging Face model directory.

    adapter: a PEFT LoRA adapter directory (or a trainer's checkpoint-N folder holding one).
    out: the output directory; written beside it and renamed into place when complete.
    base: the base model, a directory or a Hub id in the local Hugging Face cache (default: the one the
        adapter names).
    dtype: "bf16", "fp16" or "fp32", the output's dtype (the merge itself is fp32).
    merge_base: "dequantized" (the 4-bit weights training saw) or "original" (the 16-bit base).
    quant: how training quantized a 16-bit base (default: established from the training record, the 4-bit
        checkpoint or the adapter's named base, else assumed with a warning).
    max_shard_size: bytes (or "5GB") per safetensors shard.
    force: replace an existing `out` that qmerge wrote (never anything else).
    allow_pickle: read .bin/.pt weights (with torch.load(weights_only=True)).
    allow_other_base: go ahead when `base` is another model than the one the adapter names.
    progress: called as (phase, done, total) while tensors are written.
    check_report: a `qmerge check --json` report (saved to a file) whose figures the model card shows.

    Returns a WriteReport (files with sha256, tensors merged, seconds, quantization, warnings).
    """
    from . import dtypes
    from .formats.plain import Plain
    from .formats.write import write_model_dir
    from .pipeline.source import open_checkpoint

    fmt = Plain(dtypes.option_dtype(dtype))  # a bad dtype is refused before anything is opened
    card_check = _card_check(check_report)
    source = open_checkpoint(
        Path(adapter), Path(base) if base else None, quant, merge_base, allow_pickle, True, allow_other_base
    )
    source.card_check = card_check
    return finished(write_model_dir(source, fmt, Path(out), max_shard_size, force, progress), source)


@keyword_errors
def export(
    source: str | Path,
    to: str,
    out: str | Path,
    base: str | Path | None = None,
    *,
    gguf_type: str = "f16",
    merge_base: str = "dequantized",
    quant: QuantSettings | None = None,
    nf4: NF4Options = NF4Options(),
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    allow_other_base: bool = False,
    progress: Progress | None = None,
    calibrate: str | Path | None = None,
    calibration_tokens: int = 8192,
    imatrix: str | Path | None = None,
    tensor_types: TensorTypes = TensorTypes(),
    keep_delta: float | None = None,
    name: str | None = None,
    modelfile: str | Path | None = None,
    check_report: str | Path | None = None,
    mmproj: str | Path | None = None,
) -> WriteReport:
    """Export `source` (a QLoRA adapter, merged on the fly, or a model directory) to one format.

    to: one of EXPORT_FORMATS: "bf16", "fp16", "fp32" (a model directory), "nf4" (a bitsandbytes 4-bit
        directory), "gguf" (a file llama.cpp loads), "gguf-lora" (a directory: the adapter as a llama.cpp
        LoRA GGUF, its base as a GGUF, an Ollama Modelfile). FORMATS says which keywords each one takes.
    gguf_type: the GGUF's type ("f32", "f16", "bf16", "q8_0", a K-quant such as "q4_k_m", "q4_0",
        "iq4_nl", "iq4_xs").
    nf4: the NF4 export's blocksize, double quant and compute dtype.
    calibrate: JSONL or text on which an NF4 export, a GGUF of a type llama.cpp quantizes, or a gguf-lora
        export's base chooses the codes of the layers 4-bit in training (calibration_tokens of it).
    imatrix: with a calibrated GGUF, also write the calibration's importance matrix here.
    tensor_types: the token embedding's and output layer's GGML types where llama.cpp's quantizer writes.
    keep_delta: with a calibrated GGUF of an adapter, layers keeping less than this share of their LoRA
        delta go to Q8_0.
    name: a GGUF's general.name (default: the base's name and the fine-tune's). With "gguf", `out` may be an
        existing directory: the file is then named by llama.cpp's convention,
        <basename>-<size>-<finetune>-<type>.gguf, inside it.
    modelfile: with "gguf", also write an Ollama Modelfile here: FROM the GGUF, with TEMPLATE, SYSTEM and
        stop strings translated from the model's chat template and checked by rendering sample
        conversations both ways (the report's "modelfile" says whether, and why not). gguf-lora writes its
        own Modelfile in its directory.
    check_report: with a model directory format, a `qmerge check --json` report whose figures its card shows.
    mmproj: with "gguf" and a vision-language model, also write its vision projector here (llama.cpp's mmproj
        GGUF, for llama-mtmd-cli / llama-server --mmproj), of the GGUF's type (f16 beside the types llama.cpp
        quantizes); the report's "mmproj" describes it.
    The other keywords are merge()'s. A combination a format does not take is an UnsupportedError.
    """
    conflict = option_conflict(
        to,
        gguf_type,
        calibrate,
        imatrix,
        tensor_types,
        keep_delta,
        name=name,
        modelfile=modelfile,
        check_report=check_report,
        mmproj=mmproj,
    )
    if conflict:
        raise UnsupportedError(conflict)
    if to in ("gguf", "gguf-lora"):
        from .formats.gguf import check_type

        check_type(gguf_type)
    from .pipeline.source import open_source

    card_check = _card_check(check_report)
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
    src.gguf_name, src.card_check = name, card_check
    src.mmproj = Path(mmproj) if mmproj is not None else None
    if to == "gguf" and Path(out).is_dir():  # a directory: the file named as llama.cpp's converter names it
        from .formats.gguf_meta import gguf_file_name, gguf_metadata

        out = Path(out) / gguf_file_name(gguf_metadata(src, gguf_type, name), gguf_type)
    from .formats.options import separate_paths

    separate_paths(out, imatrix, modelfile, mmproj)
    if keep_delta is not None and src.adapter is None:
        raise UnsupportedError(
            f"{source}: keep_delta keeps a share of an adapter's delta; this is a model directory, with no "
            "delta to keep."
        )
    job = Job(
        to,
        Path(out),
        gguf_type,
        nf4,
        max_shard_size,
        force,
        progress,
        Path(calibrate) if calibrate is not None else None,
        calibration_tokens,
        Path(imatrix) if imatrix is not None else None,
        tensor_types,
        keep_delta,
        Path(modelfile) if modelfile is not None else None,
        Path(mmproj) if mmproj is not None else None,
    )
    report = write_format(src, job)
    return finished(report, src)


def _card_check(path: str | Path | None) -> dict | None:
    """The check report a model card shows, read before any work (None without one)."""
    if path is None:
        return None
    from .io.card import read_check_report

    return read_check_report(Path(path))


@keyword_errors
def check(
    adapter: str | Path,
    candidate: str | Path,
    base: str | Path | None = None,
    *,
    max_kl: float | None = 0.01,
    min_top1: float | None = 0.95,
    max_abs_diff: float | None = None,
    min_task_agreement: float | None = None,
    thresholds: Thresholds | None = None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    text: str | None = None,
    data: str | Path | None = None,
    generate: int = 0,
    max_new_tokens: int = 64,
    seq_len: int = 128,
    max_seqs: int = 8,
    against_base: bool = False,
    naive: bool = False,
    device: str = "auto",
    fp32_reference: bool = False,
    lora: str | Path | None = None,
    probe_quant: str | None = None,
    allow_other_base: bool = False,
    progress: Progress | None = None,
) -> CheckReport:
    """Compare `candidate` (a merged directory, an NF4 export or a GGUF file) with the unmerged QLoRA model
    (base + adapter as transformers and PEFT run it) on the same tokens, and apply the thresholds.

    max_kl, min_top1, max_abs_diff, min_task_agreement: the gate (None switches one off); or thresholds=
        a verify.metrics.Thresholds, which then replaces them.
    text: text to evaluate on (default: a built-in paragraph), seq_len tokens a sequence, max_seqs of them.
    data: JSONL as `qmerge train` reads it: drift on its response tokens, over its first max_seqs records.
    generate: also compare greedy completions of this many of data's prompts (max_new_tokens each).
    against_base: also measure how far the candidate moved from the base model.
    naive: also measure PEFT's merge_and_unload on the 4-bit model.
    device: "auto", "cpu" (streamed, fp32) or "cuda"; fp32_reference runs CUDA's reference in fp32.
    lora: a llama.cpp LoRA GGUF applied to a GGUF candidate.
    probe_quant: "warn" or "fail": measure the adapter's loss on data under NF4/FP4 x double quant x load
        dtype, and warn (or fail) when the other 4-bit type fits clearly better than the one in use.
    base, quant, merge_base, allow_other_base: as for merge().

    Returns a CheckReport (`passed`, `metrics`, `failures`, ...); a failed gate is a report, not an error.
    """
    from .verify.check import check as run
    from .verify.metrics import Thresholds
    from .verify.options import Options

    if thresholds is None:
        thresholds = Thresholds(max_kl, min_top1, max_abs_diff, min_task_agreement)
    options = Options(
        text=text,
        seq_len=seq_len,
        max_seqs=max_seqs,
        data=Path(data) if data is not None else None,
        generate=generate,
        max_new_tokens=max_new_tokens,
        against_base=against_base,
        naive=naive,
        device=device,
        fp32_reference=fp32_reference,
        lora=Path(lora) if lora is not None else None,
        allow_other_base=allow_other_base,
        probe_quant=probe_quant,
    )
    return run(adapter, candidate, base, thresholds, quant, merge_base, progress, options)


@keyword_errors
def describe(path: str | Path, base: str | Path | None = None, *, allow_pickle: bool = False) -> Description:
    """Describe a base, an adapter (with its base), a merged model or a GGUF file without loading a model:
    architecture, parameter count, quantization, the adapter's settings and modules, problems found. The
    record `qmerge inspect --json` prints is its to_json()."""
    from .description import describe as run

    return run(Path(path), Path(base) if base is not None else None, allow_pickle)


def finished(report: WriteReport, source: Source) -> WriteReport:
    """The report with what the source established on the way: warnings, and how the base was quantized
    (null where no 4-bit weights were read or reproduced)."""
    four_bit = source.quantization is not None and (source.base.is_4bit or source.merge_base == "dequantized")
    q = source.quantization.to_json() if four_bit else None
    return replace(report, warnings=[*report.warnings, *source.warnings], quantization=q)
