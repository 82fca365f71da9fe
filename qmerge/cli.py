"""The qmerge command line: Click only. Parse, call one library function, render with rich or JSON.

This module is long because it declares every option of six commands (shared groups are declared once:
the base, quantization, output and threshold options); the work is done in api.py and below.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console

from . import __version__
from .errors import QmergeError
from .formats.options import EXPORT_FORMATS
from .names import DTYPES, MERGE_BASES
from .names import GGUF_TENSOR_TYPES as TENSOR_TYPE_NAMES

# bitsandbytes (imported by transformers in check/train) logs a warning about an optional CPU
# inference kernel qmerge never uses.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR, EXIT_USAGE, EXIT_DRIFT, EXIT_INTERRUPTED = 1, 2, 3, 130


# ---- shared plumbing ----------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (atomic outputs remove their temporaries) and exit."""


_signalled: list[int] = []


def _on_signal(signum, frame):
    """Raise Interrupted where Python code runs, but not inside an import: an exception raised into a C
    extension's initialisation can leave it half-loaded ("cannot load module more than once") or abort the
    process (pybind11's terminate). There the signal is delivered again a moment later."""
    _signalled.append(signum)
    if _importing(frame):
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    raise Interrupted(signum)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupt_code(e: BaseException) -> int:
    """130 for Ctrl-C (SIGINT), 143 for SIGTERM: 128 + the signal, as shells report it."""
    return 128 + e.args[0] if isinstance(e, Interrupted) and e.args else EXIT_INTERRUPTED


def _fail(message: str, code: int = EXIT_ERROR, as_json: bool = False) -> None:
    """Say `message` on stderr (and, with --json, as the contract's error object on stdout); exit `code`."""
    if as_json:
        _emit_error_json(message, code)
    err.print(f"[bold red]qmerge: error:[/] {message}", markup=True, highlight=False)
    sys.exit(code)


def _emit_error_json(message: str, code: int) -> None:
    """The contract's error object on stdout, for scripts that parse --json output."""
    click.echo(json.dumps({"error": message, "exit_code": code}))


def _wants_json(ctx: click.Context) -> bool:
    """Whether the command line asks for --json (read from the raw arguments, so that an error raised
    while they are parsed is reported as JSON too)."""
    args = [*getattr(ctx, "_protected_args", ()), *ctx.args]
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


class QmergeGroup(click.Group):
    """Maps library errors to exit 1 with one readable message, interrupts to 130; QMERGE_DEBUG=1 re-raises.
    With --json, every error is also printed on stdout as {"error": MESSAGE, "exit_code": N}."""

    def invoke(self, ctx):
        from .spelling import CLI

        token = CLI.set(True)  # the library's messages keep the options' spelling
        try:
            return self._invoke(ctx)
        finally:
            CLI.reset(token)

    def _invoke(self, ctx):
        debug = bool(os.environ.get("QMERGE_DEBUG"))
        as_json = _wants_json(ctx)
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if as_json:
                _emit_error_json(e.format_message(), e.exit_code)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BaseException as e:
            if debug:
                raise
            if _signalled or isinstance(e, KeyboardInterrupt | Interrupted):
                # an interrupt, also one that surfaced as another error (inside an import, say)
                code = 128 + _signalled[0] if _signalled else _interrupt_code(e)
                _fail("interrupted; nothing was written.", code, as_json)
            if isinstance(e, QmergeError):
                _fail(str(e), as_json=as_json)
            if isinstance(e, MemoryError):
                _fail("out of memory. Close other programs or use a machine with more RAM.", as_json=as_json)
            if not isinstance(e, Exception):
                raise
            _fail(  # a traceback must never reach the user
                f"unexpected {type(e).__name__}: {e}. Re-run with QMERGE_DEBUG=1 for the traceback and report it.",
                as_json=as_json,
            )


@contextmanager
def progress_bar(label: str, enabled: bool = True, lines: bool = False):
    """A rich progress bar on stderr (also with --json: stdout holds the JSON alone); yields a (name, done,
    total) callback. Where stderr is not a terminal (a CI log), with `lines` the reports that end a phase
    ("... tokens/s") are printed as lines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not err.is_terminal:
        if enabled and lines:
            yield lambda name, done, total: err.print(f"{label} {name}") if "tokens/s" in name else None
        else:
            yield None
        return
    with Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("reading the inputs", total=None)  # at once, before the first tensor

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=name[-60:])

        yield update


def _warn(warnings: list[str]) -> None:
    """What the run noticed and went ahead with, on stderr (--json carries them as "warnings" too)."""
    for w in warnings:
        err.print(f"[yellow]qmerge: warning:[/] {w}", markup=True, highlight=False)


def _say_quantization(q: dict | None) -> None:
    """One line: the 4-bit settings the base was read or reproduced with, and how qmerge knows them."""
    if q:
        dq = "double quant" if q["double_quant"] else "no double quant"
        where = f" ({q['from']})" if q.get("from") else ""
        out.print(
            f"base quantization: {q['quant_type']}, {dq}, blocksize {q['blocksize']}; {q['source']}{where}"
        )


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


class Threshold(click.ParamType):
    """A finite float in [lo, hi] (a NaN or an out-of-range limit would switch the gate off)."""

    name = "float"

    def __init__(self, lo: float, hi: float = math.inf):
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if not math.isfinite(x) or not self.lo <= x <= self.hi:
            bound = (
                f"between {self.lo:g} and {self.hi:g}" if math.isfinite(self.hi) else f"at least {self.lo:g}"
            )
            self.fail(f"{value!r} must be a finite number {bound}.", param, ctx)
        return x


def _size_option(ctx, param, value):
    """Click callback: '2GB', '500MB', '1GiB' or bytes -> int, or a usage error (exit 2)."""
    from .io.hf_dir import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


base_option = click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Base model: a directory, or a Hub id (org/name[@revision]) in the local Hugging Face cache "
    "(default: the adapter's base_model_name_or_path).",
)
other_base_option = click.option(
    "--allow-other-base",
    is_flag=True,
    help="Go ahead when --base is another model than the base the adapter names (compared when that one is here).",
)
pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Allow reading .bin/.pt weights (torch.load weights_only=True)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
merge_base_option = click.option(
    "--merge-base",
    type=click.Choice(MERGE_BASES),
    default=MERGE_BASES[0],
    show_default=True,
    help="dequantized: the NF4 weights training saw; original: the 16-bit base.",
)
quant_options = _options(
    click.option(
        "--quant-type",
        type=click.Choice(["nf4", "fp4"]),
        default=None,
        help="4-bit type used in training (default nf4).",
    ),
    click.option(
        "--blocksize",
        type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
        default=None,
        help="4-bit blocksize used in training (default 64).",
    ),
    click.option(
        "--double-quant/--no-double-quant",
        default=None,
        help="Training used double quantization (default: yes).",
    ),
    click.option(
        "--quant-dtype",
        type=click.Choice(DTYPES),
        default=None,
        help="dtype the 16-bit base was loaded in for training (default: as stored).",
    ),
)
output_options = _options(
    click.option(
        "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output path."
    ),
    click.option(
        "--max-shard-size",
        "shard",
        default="5GB",
        show_default=True,
        callback=_size_option,
        help="Shard the output beyond this size.",
    ),
    click.option("--force", is_flag=True, help="Replace an existing output that qmerge wrote."),
)


def _quant(quant_type, blocksize, double_quant, quant_dtype):
    if quant_type is None and blocksize is None and double_quant is None and quant_dtype is None:
        return None  # let qmerge read the training record or use QLoRA defaults
    from .dtypes import option_dtype
    from .pipeline.base import QuantSettings

    return QuantSettings(
        quant_type=quant_type or "nf4",
        blocksize=int(blocksize or 64),
        double_quant=True if double_quant is None else double_quant,
        dtype=option_dtype(quant_dtype) if quant_dtype else None,
    )


def _read_text(path: Path) -> str:
    """The --text file as UTF-8 text, refused when it is empty or not text."""
    from .io.files import open_regular

    with open_regular(path) as f:
        raw = f.read(64 * 2**20)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise QmergeError(f"{path}: not UTF-8 text ({e}); --text takes a plain text file.") from e
    if "\x00" in text:
        raise QmergeError(f"{path}: holds NUL bytes, so it is not text; --text takes a plain text file.")
    if not text.strip():
        raise QmergeError(f"{path}: is empty; --text needs text to evaluate on.")
    return text


# ---- commands -----------------------------------------------------------------------------------------


@click.group(cls=QmergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="qmerge")
def cli():
    """Take a QLoRA fine-tune from training to deployment without losing what it learned, and prove it."""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@base_option
@json_option
@pickle_option
@click.option("--modules", "per_module", is_flag=True, help="One row per module instead of one per kind.")
def inspect(path, base, as_json, allow_pickle, per_module):
    """Describe a base, adapter, merged model or GGUF file without loading a model."""
    from .description import describe
    from .render import describe_tables

    info = describe(path, base, allow_pickle).to_json()
    if as_json:
        _emit_json(info)
        return
    for table in describe_tables(info, per_module):
        out.print(table)
    problems = info.get("problems") or []
    for p in problems:
        colour = "red" if p["severity"] == "error" else "yellow"
        out.print(f"[{colour}]{p['severity']}[/]: {p['message']}")
    if not problems:
        out.print("[green]no problems found[/]")


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@base_option
@output_options
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True)
@merge_base_option
@json_option
@pickle_option
@quant_options
@other_base_option
@click.option(
    "--check-report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A `qmerge check --json` report (saved to a file) whose figures the model card shows.",
)
def merge(
    adapter,
    base,
    output,
    shard,
    force,
    dtype,
    merge_base,
    as_json,
    allow_pickle,
    allow_other_base,
    check_report,
    **quant,
):
    """Merge a QLoRA adapter into the weights its training saw (fp32 math, streamed)."""
    from .api import merge as do_merge
    from .render import files_table

    with progress_bar("merging") as cb:  # on stderr: with --json too, where stderr is a terminal
        report = do_merge(
            adapter,
            output,
            base,
            dtype=dtype,
            merge_base=merge_base,
            quant=_quant(**quant),
            max_shard_size=shard,
            force=force,
            allow_pickle=allow_pickle,
            allow_other_base=allow_other_base,
            progress=cb,
            check_report=check_report,
        )
    _warn(report.warnings)
    if as_json:
        _emit_json(report.to_json())
    else:
        out.print(files_table(report))
        _say_quantization(report.quantization)
        out.print(f"merged {report.num_tensors_merged} tensors in {report.seconds:.1f} s")


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@base_option
@click.option(
    "--candidate",
    type=click.Path(path_type=Path),
    help="Merged directory, NF4 export or GGUF file (required).",
)
@click.option(
    "--max-kl",
    type=Threshold(0.0),
    default=0.01,
    show_default=True,
    help="Fail when the mean KL exceeds this.",
)
@click.option(
    "--min-top1",
    type=Threshold(0.0, 1.0),
    default=0.95,
    show_default=True,
    help="Fail when top-1 agreement is below this.",
)
@click.option(
    "--max-abs-diff", type=Threshold(0.0), default=None, help="Fail when max |logit difference| exceeds this."
)
@click.option(
    "--min-task-agreement",
    type=Threshold(0.0, 1.0),
    default=None,
    help="Fail when fewer completions than this share equal the unmerged model's (needs --generate).",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text to evaluate on.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL as qmerge train reads it (the held-out split), or chats with images: drift on its response tokens.",
)
@click.option(
    "--generate",
    type=click.IntRange(1, 10000),
    default=None,
    help="Compare greedy completions of N of --data's prompts.",
)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option(
    "--against-base",
    is_flag=True,
    help="Also measure how far the candidate moved from the base model (no adapter).",
)
@click.option("--seq-len", type=click.IntRange(2, 8192), default=128, show_default=True)
@click.option(
    "--max-seqs",
    type=click.IntRange(1, 1024),
    default=8,
    show_default=True,
    help="Sequences of text, or records of --data.",
)
@click.option(
    "--probe-quant",
    type=click.Choice(["warn", "fail"]),
    default=None,
    help="Also measure the adapter's loss on --data under NF4/FP4 x double quant x load dtype, and warn (or "
    "fail, exit 3) when the other 4-bit type fits clearly better than the one used.",
)
@click.option(
    "--naive", is_flag=True, help="Also measure PEFT's merge_and_unload on the 4-bit model (loads it whole)."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="cpu: both models streamed a module at a time in fp32; cuda: on the GPU, the reference as training ran it.",
)
@click.option("--fp32-reference", is_flag=True, help="On CUDA, run the reference (and candidate) in fp32.")
@click.option(
    "--lora",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A llama.cpp LoRA GGUF applied to a GGUF --candidate (export --to gguf-lora).",
)
@click.option(
    "--merge-base",
    type=click.Choice(MERGE_BASES),
    default=MERGE_BASES[0],
    show_default=True,
    help="original: compare against the adapter on the 16-bit base instead.",
)
@click.option(
    "--compare-merge-bases",
    is_flag=True,
    help="Instead of a candidate: measure merges into the NF4 weights and into the 16-bit base, and recommend one.",
)
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as FILE.html or FILE.md.",
)
@click.option("--force", is_flag=True, help="Replace an existing --report that qmerge wrote.")
@json_option
@quant_options
@other_base_option
def check(
    adapter,
    base,
    candidate,
    max_kl,
    min_top1,
    max_abs_diff,
    min_task_agreement,
    text_file,
    report_file,
    force,
    as_json,
    **kw,
):
    """Compare a candidate with the unmerged QLoRA model; exit 3 when drift is too large."""
    quant_args = [kw.pop(k) for k in ("quant_type", "blocksize", "double_quant", "quant_dtype")]
    merge_base, compare_bases, generate = (
        kw.pop("merge_base"),
        kw.pop("compare_merge_bases"),
        kw.pop("generate"),
    )
    if (candidate is None) == (not compare_bases):
        raise click.UsageError("give --candidate PATH, or --compare-merge-bases (one of the two).")
    if (min_task_agreement is not None or generate) and kw["data"] is None:
        raise click.UsageError("--generate and --min-task-agreement need --data (the prompts come from it).")
    if kw["probe_quant"] and kw["data"] is None:
        raise click.UsageError("--probe-quant needs --data (the adapter's loss is measured on its records).")
    if kw["probe_quant"] and compare_bases:
        raise click.UsageError("--probe-quant goes with --candidate, not --compare-merge-bases.")
    if min_task_agreement is not None and not generate:
        raise click.UsageError("--min-task-agreement needs --generate N.")
    if report_file is not None and report_file.suffix not in (".html", ".md"):
        raise click.UsageError("--report takes a FILE.html or FILE.md.")
    from .verify.metrics import Thresholds  # torch: after the usage errors, which answer at once

    quant = _quant(*quant_args)
    if report_file is not None:  # refused now, not after the check
        from .reportfile import check_report_path, report_inputs

        inputs = report_inputs(adapter, base, candidate, kw["data"], text_file, kw["lora"])
        check_report_path(report_file, force, inputs)
    options = dict(kw, text=_read_text(text_file) if text_file is not None else None, generate=generate or 0)
    thresholds = Thresholds(max_kl, min_top1, max_abs_diff, min_task_agreement)
    with progress_bar("check", lines=True) as cb:
        if compare_bases:
            from .verify.bases import compare_merge_bases

            report = compare_merge_bases(adapter, base, quant, cb, **options)
        else:
            from .verify.check import check as do_check

            report = do_check(adapter, candidate, base, thresholds, quant, merge_base, cb, **options)
    if report_file is not None:
        from .reportfile import write_report

        write_report(report, report_file, force, inputs)
    _show_check(report, as_json)


def _show_check(report, as_json: bool) -> None:
    from .render import bases_table, check_tables

    _warn(getattr(report, "extra", {}).get("warnings", []))
    if as_json:
        _emit_json(report.to_json())
    elif hasattr(report, "recommendation"):
        out.print(bases_table(report))
    else:
        for table in check_tables(report):
            out.print(table)
        _say_quantization(report.extra.get("quantization"))
        if report.delta_retention is not None:
            out.print(
                f"this NF4 export kept {report.delta_retention:.1%} of the LoRA delta (qmerge_provenance.json)"
            )
        out.print(
            "[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]: " + "; ".join(report.failures)
        )
    if not getattr(report, "passed", True):
        sys.exit(EXIT_DRIFT)


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(EXPORT_FORMATS),
    help="gguf-lora: OUT/ holds adapter.gguf, base-TYPE.gguf (--gguf-type) and an Ollama Modelfile.",
)
@click.option(
    "--gguf-type",
    default="f16",
    show_default=True,
    help="f32, f16, bf16, q8_0; a K-quant such as q4_k_m, or q4_0, iq4_nl, iq4_xs (llama.cpp's "
    "quantizer; with --calibrate qmerge chooses the 4-bit layers' blocks).",
)
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Base model directory or Hub id in the local Hugging Face cache (when SOURCE is an adapter).",
)
@output_options
@merge_base_option
@click.option(
    "--nf4-blocksize",
    type=click.Choice(["32", "64", "128", "256"]),
    default="64",
    show_default=True,
    help="Blocksize of the NF4 export (transformers loads 64).",
)
@click.option("--nf4-double-quant/--nf4-no-double-quant", default=True, show_default=True)
@click.option(
    "--calibrate",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="NF4, or a GGUF (or gguf-lora's base) of a type llama.cpp quantizes: choose the codes of the "
    "layers 4-bit in training with error feedback (GPTQ; NF4, IQ4, Q4_0, Q4_K, Q5_K, Q6_K) or llama.cpp's "
    "importance matrix (other types) on this JSONL (qmerge train's formats) or text.",
)
@click.option("--calibration-tokens", type=click.IntRange(16, 1 << 20), default=8192, show_default=True)
@click.option(
    "--keep-delta",
    type=click.FloatRange(0, 1),
    help="With --to gguf --calibrate: layers that keep less than this share of their LoRA delta go to Q8_0 "
    "(the size added is reported).",
)
@click.option(
    "--gguf-embedding-type",
    type=click.Choice(TENSOR_TYPE_NAMES, case_sensitive=False),
    help="The token embedding's GGML type in a file llama.cpp's quantizer writes (its "
    "--token-embedding-type; default: its rule's, Q4_K in q4_k_m).",
)
@click.option(
    "--gguf-output-type",
    type=click.Choice(TENSOR_TYPE_NAMES, case_sensitive=False),
    help="The output layer's GGML type, likewise (its --output-tensor-type).",
)
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --to gguf --calibrate: also write the calibration's importance matrix here (llama.cpp's "
    "imatrix GGUF, for llama-quantize --imatrix).",
)
@click.option("--nf4-compute-dtype", type=click.Choice(DTYPES), default="bf16", show_default=True)
@click.option(
    "--name",
    help="The GGUF's general.name (default: the base's name and the fine-tune's: the adapter's folder, or "
    "the run's above a checkpoint-N). With -o DIR, the file is named DIR/<basename>-<size>-<finetune>-<type>.gguf.",
)
@click.option(
    "--modelfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --to gguf: also write an Ollama Modelfile here (FROM the GGUF; TEMPLATE, SYSTEM and stop "
    "strings translated from the model's chat template and checked by rendering).",
)
@click.option(
    "--mmproj",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --to gguf and a vision-language model (Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Llama 4, Mistral 3, Pixtral, SmolVLM and Idefics3): also write its vision "
    "projector here, the mmproj GGUF llama.cpp loads with --mmproj (the GGUF's type; f16 beside K-quants).",
)
@click.option(
    "--check-report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With a model directory format: a `qmerge check --json` report whose figures the model card shows.",
)
@json_option
@pickle_option
@quant_options
@other_base_option
def export(
    source,
    to,
    gguf_type,
    base,
    output,
    shard,
    force,
    merge_base,
    nf4_blocksize,
    nf4_double_quant,
    nf4_compute_dtype,
    calibrate,
    calibration_tokens,
    keep_delta,
    gguf_embedding_type,
    gguf_output_type,
    imatrix,
    name,
    modelfile,
    mmproj,
    check_report,
    as_json,
    allow_pickle,
    allow_other_base,
    **quant,
):
    """Export a QLoRA checkpoint or merged directory to bf16/fp16/fp32, NF4, GGUF or a LoRA GGUF."""
    from .formats.options import CLI_NAMES, NF4Options, TensorTypes, option_conflict

    tensor_types = TensorTypes(
        gguf_embedding_type and gguf_embedding_type.lower(), gguf_output_type and gguf_output_type.lower()
    )
    conflict = option_conflict(
        to,
        gguf_type,
        calibrate,
        imatrix,
        tensor_types,
        keep_delta,
        CLI_NAMES,
        name,
        modelfile,
        check_report,
        mmproj,
    )
    if conflict:
        raise click.UsageError(conflict)
    from .api import export as do_export
    from .render import files_table

    with progress_bar(f"exporting {to}") as cb:
        report = do_export(
            source,
            to,
            output,
            base,
            gguf_type=gguf_type,
            merge_base=merge_base,
            quant=_quant(**quant),
            nf4=NF4Options(int(nf4_blocksize), nf4_double_quant, nf4_compute_dtype),
            max_shard_size=shard,
            force=force,
            allow_pickle=allow_pickle,
            progress=cb,
            calibrate=calibrate,
            calibration_tokens=calibration_tokens,
            imatrix=imatrix,
            tensor_types=tensor_types,
            keep_delta=keep_delta,
            allow_other_base=allow_other_base,
            name=name,
            modelfile=modelfile,
            check_report=check_report,
            mmproj=mmproj,
        )
    _warn(report.warnings)
    if as_json:
        _emit_json(report.to_json())
        return
    out.print(files_table(report))
    _say_quantization(report.quantization)
    cal = report.details.get("calibration")
    if cal:
        out.print(
            f"calibrated on {cal['tokens']} tokens: output error {cal['output_error_vs_rounding']:.1%} of plain "
            "rounding's"
        )
    kept = report.details.get("keep_delta")
    if kept:
        out.print(
            f"--keep-delta {kept['threshold']}: {len(kept['layers'])} layer(s) at Q8_0, "
            f"+{kept['bytes_added']:,} bytes ({kept['size_increase']:.1%})"
        )
    retention = report.details.get("delta_retention")
    if retention:
        out.print(
            f"LoRA delta kept after 4-bit requantization: {retention['total']:.1%} of ||delta|| "
            f"(worst layer {retention['worst_layer']}: {retention['worst']:.1%})"
        )
    out.print(f"done in {report.seconds:.1f} s")


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory (16-bit).")
@click.option(
    "--data", type=click.Path(path_type=Path), help="JSONL: chat 'messages', instruction/response, or 'text'."
)
@click.option(
    "-o", "--output", "output", type=click.Path(path_type=Path), help="Output directory for checkpoints."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML or JSON config; options override it.",
)
@click.option("--eval-data", type=click.Path(path_type=Path), help="JSONL for eval loss.")
@click.option("--r", "r", type=int, help="LoRA rank (default 64).")
@click.option("--lora-alpha", type=float, help="LoRA alpha (default 16).")
@click.option("--lora-dropout", type=float, help="LoRA dropout (default 0.05).")
@click.option("--target-modules", help="all-linear (default) or a comma-separated list.")
@click.option("--use-rslora/--no-rslora", default=None, help="Scale by alpha/sqrt(r).")
@click.option("--use-dora/--no-dora", default=None, help="Train DoRA.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, help="Default 2e-4, constant.")
@click.option("--epochs", "num_train_epochs", type=float, help="Default 1.")
@click.option("--max-steps", type=int, help="Overrides --epochs when set.")
@click.option("--batch-size", "per_device_train_batch_size", type=int, help="Per device (default 4).")
@click.option("--grad-accum", "gradient_accumulation_steps", type=int, help="Default 4.")
@click.option("--max-seq-len", "max_seq_length", type=int, help="Default 512.")
@click.option("--save-steps", type=int, help="Checkpoint every N steps (default 100).")
@click.option("--eval-steps", type=int, help="Default: --save-steps.")
@click.option("--logging-steps", type=int, help="Default 10.")
@click.option("--seed", type=int, help="Default 42.")
@click.option("--compute-dtype", type=click.Choice(DTYPES), help="Default bf16 on CUDA, fp32 on CPU.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Default on.")
@click.option(
    "--quant-storage",
    type=click.Choice(["uint8", "bf16", "fp16", "fp32"]),
    help="dtype the packed 4-bit weights are stored in (default uint8; bf16 for FSDP-QLoRA).",
)
@click.option("--optim", help="Default paged_adamw_32bit on CUDA, adamw_torch on CPU.")
@click.option("--resume", "resume_from_checkpoint", help="A checkpoint directory, or 'latest'.")
@json_option
def train(config_file, as_json, **options):
    """QLoRA training (NF4 + double quant, all-linear LoRA, paged AdamW on CUDA)."""
    from .train.config import load_train_config
    from .train.trainer import train as do_train

    cfg = load_train_config(config_file, {k: v for k, v in options.items() if v is not None})
    result = do_train(cfg, log=None if as_json else err.print)
    if result["rank"] != 0:  # under torchrun / accelerate launch only the main process reports
        return
    if as_json:
        _emit_json(result)
    else:
        out.print(
            f"saved adapter to [bold]{result['output']}[/] (final loss {result['train_loss']:.4f}"
            + (f", eval loss {result['eval_loss']:.4f}" if result.get("eval_loss") is not None else "")
            + ")"
        )


@cli.command()
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path),
    default=Path("qmerge-demo"),
    show_default=True,
)
@click.option("--force", is_flag=True, help="Replace an existing demo directory.")
@click.option(
    "--steps", type=click.IntRange(1), default=None, help="Training steps (default: the demo's tuned value)."
)
@json_option
def demo(output, force, steps, as_json):
    """The whole path on a built-in tiny model: train, merge, check, export, with one table."""
    from .demo.run import run_demo
    from .render import demo_table

    result = run_demo(output, force=force, steps=steps, log=(lambda *a, **k: None) if as_json else err.print)
    if as_json:
        _emit_json(result)
    else:
        out.print(demo_table(result))


def main() -> None:
    signal.signal(signal.SIGINT, _on_signal)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _on_signal)
    try:
        cli(prog_name="qmerge")
    except (KeyboardInterrupt, Interrupted) as e:  # outside a command (while Click parses or exits)
        _fail("interrupted; nothing was written.", _interrupt_code(e))


if __name__ == "__main__":
    main()
