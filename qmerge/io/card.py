"""The model card (README.md) of every model directory qmerge writes, in the Hub's format: YAML front matter
(`base_model`, `base_model_relation`, `library_name`, `tags`, `license` and `datasets` as the base's and the
adapter's own cards give them), then how the model was made. No local path goes into it: it is published
with the model."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from .hub import local_directory, parse_hub_id
from .records import identify

CARD = "README.md"


def front_matter_of(directory: Path | None) -> dict:
    """The YAML front matter of a directory's README.md (a model card), {} when it has none or it is not
    valid YAML: the card is an input to read, never a reason to fail."""
    path = Path(directory) / CARD if directory is not None else None
    if path is None or not path.is_file():
        return {}
    if not path.read_text(encoding="utf-8", errors="replace").lstrip().startswith("---"):
        return {}  # no front matter (huggingface_hub would log that it found none)
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(path).data.to_dict()
    except Exception:  # noqa: BLE001 - a malformed card on the user's side
        return {}
    return data if isinstance(data, dict) else {}


def hub_id_of(directory: Path, named: str | None = None, beside: Path | None = None) -> str | None:
    """The Hub id a model is known by: its cache snapshot's, else `named` (the adapter's
    base_model_name_or_path, relative paths taken `beside` the adapter) when that is a Hub id and not a
    local directory; None when neither says."""
    found = identify(directory).get("hub_id")
    if found:
        return found
    if not named or local_directory(named, beside or Path.cwd()) is not None:
        return None
    return named if parse_hub_id(named) and "@" not in named else None


def model_card(source, settings: dict, name: str) -> str:
    """README.md for a directory written from `source` (a pipeline Source) with `settings` (the format's)."""
    meta = card_data(source, settings)
    from huggingface_hub import ModelCardData

    yaml = ModelCardData(**meta).to_yaml()
    quantized = settings.get("export") == "nf4"
    return f"---\n{yaml}\n---\n\n{_body(source, settings, name, meta.get('base_model'), quantized)}"


def card_data(source, settings: dict) -> dict:
    """The card's front matter (keys with a value), as the Hub and gguf-py's Metadata read it."""
    adapter = source.adapter
    base_card = front_matter_of(source.base.path)
    adapter_card = front_matter_of(adapter.path) if adapter is not None else {}
    quantized = settings.get("export") == "nf4"
    if adapter is not None:
        base_id = hub_id_of(source.base.path, adapter.base_model_name_or_path, adapter.path)
        relation = "quantized" if quantized else "merge"
    else:  # a model directory re-exported: its own base, as its card names it
        base_id = hub_id_of(source.base.path) or _single(base_card.get("base_model"))
        relation = "quantized" if quantized and base_id else None
    tags = ["qmerge", "lora", "qlora", "merged" if adapter is not None else None]
    tags += ["4-bit", "bitsandbytes", "nf4"] if quantized else []
    # the cards' own tags, but not "base_model:..." ones (the Hub derives those, and PEFT writes them with
    # the local path training used)
    theirs = _list(adapter_card.get("tags")) + _list(base_card.get("tags"))
    tags += [t for t in theirs if t not in tags and not t.startswith("base_model:")]
    meta = {
        "base_model": base_id,
        "base_model_relation": relation if base_id else None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation" if _causal(source.config) else None,
        "license": adapter_card.get("license") or base_card.get("license"),
        "datasets": _list(adapter_card.get("datasets")) or None,
        "tags": [t for t in tags if t],
    }
    return {k: v for k, v in meta.items() if v is not None}


def _body(source, settings: dict, name: str, base_id: str | None, quantized: bool) -> str:
    base = (
        f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"the base `{source.base.path.name}`"
    )
    q = source.quantization
    lines = [f"# {name}", ""]
    if source.adapter is not None:
        s = source.adapter.settings
        lines.append(
            f"The LoRA adapter `{source.adapter.path.name}` (r={s.r}, lora_alpha={s.lora_alpha}"
            + (", rsLoRA" if s.use_rslora else "")
            + (", DoRA" if s.use_dora else "")
            + f") merged into {base} by qmerge {__version__}."
        )
        into = (
            "the 4-bit weights training saw (each 4-bit layer dequantized exactly as bitsandbytes does, the "
            "LoRA delta added in fp32)"
            if source.merge_base == "dequantized"
            else "the original 16-bit weights of the base (not the 4-bit weights training saw)"
        )
        lines += ["", f"- Merged into {into}."]
        if q is not None:
            qs = q.settings
            dq = "double quantization" if qs.double_quant else "no double quantization"
            lines.append(
                f"- The base's 4-bit quantization in training: {qs.quant_type}, {dq}, blocksize {qs.blocksize} "
                f"(source: {q.source}{': ' + q.origin if q.origin else ''})."
            )
    else:
        lines.append(f"{base}, re-exported by qmerge {__version__}.")
    if quantized:
        nf4 = settings.get("nf4", {})
        lines.append(
            f"- Stored as bitsandbytes 4-bit {nf4.get('quant_type', 'nf4')} (blocksize {nf4.get('blocksize')}, "
            f"{'double quant' if nf4.get('double_quant') else 'no double quant'}); transformers loads it as is."
        )
    else:
        lines.append(f"- Stored as {settings.get('dtype')} safetensors; no quantization config.")
    lines += check_lines(getattr(source, "card_check", None))
    lines += [
        "- `qmerge_provenance.json` lists the inputs (names, Hub ids and revisions, the adapter files' sha256) "
        "and the settings.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "## Check",
        "",
        "`qmerge check ADAPTER --candidate PATH_OR_REPO --data HELDOUT.jsonl` compares this model with the "
        "unmerged fine-tune (base + adapter as transformers and PEFT run it) on your data.",
        "",
    ]
    return "\n".join(lines)


def read_check_report(path: Path) -> dict:
    """A `qmerge check --json` report for the card, or an InputError that says what is wrong with it."""
    from ..errors import InputError
    from .files import read_json

    report = read_json(Path(path))
    if not isinstance(report.get("passed"), bool) or not isinstance(report.get("metrics"), dict):
        raise InputError(
            f"{path}: not a report of qmerge check (no passed/metrics); save one with "
            "`qmerge check ... --json > check.json`."
        )
    return report


_FIGURES = (  # (check JSON metric, the card's words, format)
    ("mean_kl", "mean KL divergence per token", "{:.3g}"),
    ("max_kl", "largest KL divergence of a token", "{:.3g}"),
    ("top1_agreement", "top-1 token agreement", "{:.2%}"),
    ("max_abs_logit_diff", "largest logit difference", "{:.3g}"),
    ("ppl_reference", "perplexity of the unmerged fine-tune", "{:.4g}"),
    ("ppl_candidate", "perplexity of the checked model", "{:.4g}"),
)


def check_lines(report: dict | None) -> list[str]:
    """The card's "Check" figures from a `qmerge check --json` report (none without one)."""
    if not report:
        return []
    m, t = report["metrics"], report.get("thresholds") or {}
    data = Path(report["data"]).name if report.get("data") else "text"
    verdict = "passed" if report["passed"] else "did not pass"
    limits = ", ".join(f"{k} {v}" for k, v in t.items() if v is not None) or "none"
    rows = [f"| {words} | {fmt.format(m[k])} |" for k, words, fmt in _FIGURES if m.get(k) is not None]
    task = report.get("task") or {}
    if task:
        rows.append(
            f"| greedy completions equal to the unmerged fine-tune's | {task['agreement']:.1%} of {task['prompts']} |"
        )
        for k, who in (("accuracy_reference", "unmerged fine-tune"), ("accuracy_candidate", "checked model")):
            if task.get(k) is not None:
                rows.append(f"| completions equal to the data's answers, {who} | {task[k]:.1%} |")
    candidate = Path(str(report.get("candidate", ""))).name
    return [
        "",
        "## Check results",
        "",
        f"`qmerge check` compared `{candidate}` with the unmerged fine-tune (the base and the adapter as "
        f"transformers and PEFT run them) on {m.get('n_tokens', '?')} tokens of {data}: it {verdict} "
        f"(thresholds: {limits}).",
        "",
        "| measure | value |",
        "|---|---|",
        *rows,
        "",
    ]


def _causal(config: dict) -> bool:
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def _list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def _single(value) -> str | None:
    values = _list(value)
    return values[0] if len(values) == 1 else None
