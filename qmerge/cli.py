"""The qmerge command line: Click only. Parse, call one library function, render with rich or JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import QmergeError

# bitsandbytes (imported by transformers in check/train) logs a warning about an optional CPU
# inference kernel qmerge never uses.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_ERROR, EXIT_USAGE, EXIT_DRIFT = 1, 2, 3


# ---- shared plumbing ----------------------------------------------------------------------------------


def _fail(message: str) -> None:
    err.print(f"[bold red]qmerge: error:[/] {message}", markup=True, highlight=False)
    sys.exit(EXIT_ERROR)


class QmergeGroup(click.Group):
    """Maps library errors to exit 1 with one readable message; QMERGE_DEBUG=1 re-raises them."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except QmergeError as e:
            if os.environ.get("QMERGE_DEBUG"):
                raise
            _fail(str(e))
        except KeyboardInterrupt:
            if os.environ.get("QMERGE_DEBUG"):
                raise
            _fail("interrupted; no output was written.")
        except MemoryError:
            _fail("out of memory. Close other programs or use a machine with more RAM.")
        except Exception as e:  # noqa: BLE001 - a traceback must never reach the user
            if os.environ.get("QMERGE_DEBUG"):
                raise
            _fail(
                f"unexpected {type(e).__name__}: {e}. Re-run with QMERGE_DEBUG=1 for the traceback and report it."
            )


@contextmanager
def progress_bar(label: str, enabled: bool = True):
    """A rich progress bar on stderr; yields a (name, done, total) callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled or not err.is_terminal:
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
        task = bar.add_task("", total=None)

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=name[-60:])

        yield update


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def quant_options(f):
    """Options that say how the base was quantized in training (when the base is given in 16-bit)."""
    f = click.option(
        "--quant-dtype",
        type=click.Choice(["bf16", "fp16", "fp32"]),
        default=None,
        help="dtype the 16-bit base was loaded in for training (default: as stored).",
    )(f)
    f = click.option(
        "--double-quant/--no-double-quant",
        default=None,
        help="Training used double quantization (default: yes).",
    )(f)
    f = click.option(
        "--blocksize",
        type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
        default=None,
        help="4-bit blocksize used in training (default 64).",
    )(f)
    f = click.option(
        "--quant-type",
        type=click.Choice(["nf4", "fp4"]),
        default=None,
        help="4-bit type used in training (default nf4).",
    )(f)
    return f


def _quant(quant_type, blocksize, double_quant, quant_dtype):
    from .merge import DTYPES
    from .plan import QuantSettings

    if quant_type is None and blocksize is None and double_quant is None and quant_dtype is None:
        return None  # let qmerge read the training record or use QLoRA defaults
    return QuantSettings(
        quant_type=quant_type or "nf4",
        blocksize=int(blocksize or 64),
        double_quant=True if double_quant is None else double_quant,
        dtype=DTYPES[quant_dtype] if quant_dtype else None,
    )


def _size_option(ctx, param, value):
    """Click callback: '2GB', '500MB', '1GiB' or bytes -> int, or a usage error (exit 2)."""
    from .merge import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _files_table(report) -> Table:
    t = Table(title=f"wrote {report.output}", show_lines=False)
    t.add_column("file")
    t.add_column("bytes", justify="right")
    t.add_column("sha256")
    for f in report.files:
        t.add_row(f.path, f"{f.bytes:,}", f.sha256[:16] + "…")
    return t


# ---- commands -----------------------------------------------------------------------------------------


@click.group(cls=QmergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qmerge")
def cli():
    """Take a QLoRA fine-tune from training to deployment without losing what it learned, and prove it."""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Base model directory (for an adapter).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--allow-pickle", is_flag=True, help="Allow reading .bin/.pt weights (torch.load weights_only=True)."
)
def inspect(path, base, as_json, allow_pickle):
    """Describe a base, adapter, merged model or GGUF file without loading a model."""
    from .inspect import inspect_path

    info = inspect_path(path, base, allow_pickle)
    if as_json:
        _emit_json(info)
        return
    _render_inspect(info)


def _render_inspect(info: dict) -> None:
    t = Table(title=f"{info['kind']}: {info['path']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("architecture", str(info.get("architecture")))
    n = info.get("num_parameters")
    t.add_row("parameters", f"{n:,}" if isinstance(n, int) else "unknown (no base)")
    q = info.get("quantization")
    if q:
        t.add_row("quantization", ", ".join(f"{k}={v}" for k, v in q.items()))
    a = info.get("adapter")
    if a:
        t.add_row(
            "adapter", f"r={a['r']} alpha={a['lora_alpha']} rsLoRA={a['use_rslora']} DoRA={a['use_dora']}"
        )
        t.add_row("target_modules", str(a["target_modules"]))
        if a["modules_to_save"]:
            t.add_row("modules_to_save", str(a["modules_to_save"]))
        if a["rank_pattern"] or a["alpha_pattern"]:
            t.add_row("patterns", f"rank={a['rank_pattern']} alpha={a['alpha_pattern']}")
    if info.get("kind") == "gguf":
        for k in ("general.name", "general.file_type"):
            if k in info["metadata"]:
                t.add_row(k, str(info["metadata"][k]))
        t.add_row("vocab_size", str(info.get("vocab_size")))
    out.print(t)
    mods = info.get("modules") or []
    if mods:
        m = Table(title=f"{len(mods)} modules")
        if info.get("kind") == "gguf":
            for c in ("tensor", "shape", "type"):
                m.add_column(c)
            for row in mods:
                m.add_row(row["name"], str(row["shape"]), row["type"])
        else:
            for c in ("module", "shape", "4-bit", "LoRA r", "scaling"):
                m.add_column(c)
            for row in mods:
                m.add_row(
                    row["name"],
                    str(row["shape"]),
                    str(row["quantized"]),
                    str(row["lora_rank"] or "-"),
                    f"{row['scaling']:.4g}" if row["scaling"] is not None else "-",
                )
        out.print(m)
    problems = info.get("problems") or []
    if problems:
        for p in problems:
            colour = "red" if p["severity"] == "error" else "yellow"
            out.print(f"[{colour}]{p['severity']}[/]: {p['message']}")
    else:
        out.print("[green]no problems found[/]")


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    help="Base model directory (default: the adapter's base_model_name_or_path).",
)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option(
    "--merge-base",
    type=click.Choice(["dequantized", "original"]),
    default="dequantized",
    show_default=True,
    help="dequantized: the NF4 weights training saw; original: the 16-bit base.",
)
@click.option(
    "--max-shard-size",
    "shard",
    default="5GB",
    show_default=True,
    callback=_size_option,
    help="Shard the output beyond this size.",
)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("--allow-pickle", is_flag=True)
@quant_options
def merge(
    adapter,
    base,
    output,
    dtype,
    merge_base,
    shard,
    force,
    as_json,
    allow_pickle,
    quant_type,
    blocksize,
    double_quant,
    quant_dtype,
):
    """Merge a QLoRA adapter into the weights its training saw (fp32 math, streamed)."""
    from .merge import merge as do_merge

    with progress_bar("merging", not as_json) as cb:
        report = do_merge(
            adapter,
            output,
            base,
            dtype,
            merge_base,
            _quant(quant_type, blocksize, double_quant, quant_dtype),
            shard,
            force,
            allow_pickle,
            cb,
        )
    if as_json:
        _emit_json(report.to_json())
    else:
        out.print(_files_table(report))
        out.print(f"merged {report.num_tensors_merged} tensors in {report.seconds:.1f} s")


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Base model directory.")
@click.option(
    "--candidate",
    required=True,
    type=click.Path(path_type=Path),
    help="Merged directory, NF4 export or GGUF file.",
)
@click.option(
    "--max-kl", type=float, default=0.01, show_default=True, help="Fail when the mean KL exceeds this."
)
@click.option(
    "--min-top1", type=float, default=0.95, show_default=True, help="Fail when top-1 agreement is below this."
)
@click.option(
    "--max-abs-diff", type=float, default=None, help="Fail when max |logit difference| exceeds this."
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text to evaluate on.",
)
@click.option("--seq-len", type=click.IntRange(2, 8192), default=128, show_default=True)
@click.option("--max-seqs", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--naive", is_flag=True, help="Also measure PEFT's merge_and_unload on the 4-bit model.")
@click.option(
    "--merge-base",
    type=click.Choice(["dequantized", "original"]),
    default="dequantized",
    show_default=True,
    help="original: compare against the adapter on the 16-bit base instead.",
)
@click.option("--json", "as_json", is_flag=True)
@quant_options
def check(
    adapter,
    base,
    candidate,
    max_kl,
    min_top1,
    max_abs_diff,
    text_file,
    seq_len,
    max_seqs,
    naive,
    merge_base,
    as_json,
    quant_type,
    blocksize,
    double_quant,
    quant_dtype,
):
    """Compare a candidate's logits with the unmerged QLoRA model; exit 3 when drift is too large."""
    from .verify import Thresholds
    from .verify import check as do_check

    text = None
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QmergeError(f"{text_file}: cannot read as UTF-8 text ({e}).") from e
    report = do_check(
        adapter,
        candidate,
        base,
        Thresholds(max_kl, min_top1, max_abs_diff),
        text,
        seq_len,
        max_seqs,
        naive,
        _quant(quant_type, blocksize, double_quant, quant_dtype),
        merge_base,
    )
    if as_json:
        _emit_json(report.to_json())
    else:
        _render_check(report)
    if not report.passed:
        sys.exit(EXIT_DRIFT)


def _render_check(report) -> None:
    t = Table(title=f"{report.candidate_kind} candidate {report.candidate} vs unmerged QLoRA model")
    t.add_column("metric")
    t.add_column("candidate", justify="right")
    if report.naive is not None:
        t.add_column("naive merge_and_unload", justify="right")
    rows = [
        ("max |logit diff|", "max_abs_logit_diff", "{:.3g}"),
        ("mean KL", "mean_kl", "{:.3g}"),
        ("max KL", "max_kl", "{:.3g}"),
        ("top-1 agreement", "top1_agreement", "{:.4f}"),
        ("ppl reference", "ppl_reference", "{:.4g}"),
        ("ppl candidate", "ppl_candidate", "{:.4g}"),
        ("tokens", "n_tokens", "{}"),
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(getattr(report.metrics, key))]
        if report.naive is not None:
            cells.append(fmt.format(getattr(report.naive, key)))
        t.add_row(label, *cells)
    out.print(t)
    if report.delta_retention is not None:
        out.print(
            f"this NF4 export kept {report.delta_retention:.1%} of the LoRA delta (qmerge_provenance.json)"
        )
    if report.passed:
        out.print("[bold green]PASSED[/]")
    else:
        out.print("[bold red]FAILED[/]: " + "; ".join(report.failures))


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Choice(["bf16", "fp16", "fp32", "nf4", "gguf"]))
@click.option(
    "--gguf-type", default="f16", show_default=True, help="f32, f16, bf16, q8_0, or a K-quant such as q4_k_m."
)
@click.option(
    "--base", type=click.Path(path_type=Path), help="Base model directory (when SOURCE is an adapter)."
)
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path))
@click.option(
    "--merge-base", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True
)
@click.option(
    "--nf4-blocksize",
    type=click.Choice(["32", "64", "128", "256"]),
    default="64",
    show_default=True,
    help="Blocksize of the NF4 export (transformers loads 64).",
)
@click.option("--nf4-double-quant/--nf4-no-double-quant", default=True, show_default=True)
@click.option(
    "--nf4-compute-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True
)
@click.option(
    "--max-shard-size",
    "shard",
    default="5GB",
    show_default=True,
    callback=_size_option,
    help="Shard the output beyond this size.",
)
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--allow-pickle", is_flag=True)
@quant_options
def export(
    source,
    to,
    gguf_type,
    base,
    output,
    merge_base,
    nf4_blocksize,
    nf4_double_quant,
    nf4_compute_dtype,
    shard,
    force,
    as_json,
    allow_pickle,
    quant_type,
    blocksize,
    double_quant,
    quant_dtype,
):
    """Export a QLoRA checkpoint or merged directory to bf16/fp16/fp32, NF4 or GGUF."""
    from . import export as ex

    quant = _quant(quant_type, blocksize, double_quant, quant_dtype)
    with progress_bar(f"exporting {to}", not as_json) as cb:
        report = ex.export(
            source,
            to,
            output,
            base=base,
            gguf_type=gguf_type,
            merge_base=merge_base,
            quant=quant,
            nf4=ex.NF4Options(int(nf4_blocksize), nf4_double_quant, nf4_compute_dtype),
            max_shard_size=shard,
            force=force,
            allow_pickle=allow_pickle,
            progress=cb,
        )
    if as_json:
        _emit_json(report.to_json())
        return
    out.print(_files_table(report))
    retention = report.details.get("delta_retention")
    if retention:
        out.print(
            f"LoRA delta kept after NF4 requantization: {retention['total']:.1%} of ||delta|| "
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
@click.option(
    "--compute-dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Default bf16 on CUDA, fp32 on CPU."
)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Default on.")
@click.option("--optim", help="Default paged_adamw_32bit on CUDA, adamw_torch on CPU.")
@click.option("--resume", "resume_from_checkpoint", help="A checkpoint directory, or 'latest'.")
@click.option("--json", "as_json", is_flag=True)
def train(config_file, as_json, **options):
    """QLoRA training (NF4 + double quant, all-linear LoRA, paged AdamW on CUDA)."""
    from .train.config import load_train_config
    from .train.trainer import train as do_train

    cfg = load_train_config(config_file, {k: v for k, v in options.items() if v is not None})
    result = do_train(cfg, log=None if as_json else err.print)
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
@click.option("--steps", type=int, default=None, help="Training steps (default: the demo's tuned value).")
@click.option("--json", "as_json", is_flag=True)
def demo(output, force, steps, as_json):
    """The whole path on a built-in tiny model: train, merge, check, export, with one table."""
    from .demo import run_demo

    result = run_demo(output, force=force, steps=steps, log=(lambda *a, **k: None) if as_json else err.print)
    if as_json:
        _emit_json(result)
        return
    from .demo import render_table

    out.print(render_table(result))


def main() -> None:
    cli(prog_name="qmerge")


if __name__ == "__main__":
    main()
