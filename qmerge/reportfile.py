"""`qmerge check --report FILE.html|FILE.md`: the check as a page a person reads or a CI job uploads as an
artifact: the tables, a histogram of per-token KLD, per-layer delta retention of an NF4 export, and the
completions that differ. The histogram is drawn with matplotlib when it is installed (pip install
"qmerge[report]"), else as a text chart."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .errors import QmergeError
from .io.atomic import Inputs, atomic_file, check_output
from .io.files import read_json
from .io.records import read_provenance
from .render import llama_cpp_lines

# The first line of every report qmerge writes: how --force knows a report is one it may replace.
MARKER = "<!-- qmerge check report -->"


def report_inputs(adapter: Path, base: Path | None, *others: Path | None) -> Inputs:
    """What a check reads (the adapter, its base, the candidate, data files): a report may touch none."""
    paths = [Path(adapter), *(Path(p) for p in others if p is not None)]
    if base is None:  # the adapter's named base, when it is a local directory
        try:
            named = read_json(Path(adapter) / "adapter_config.json").get("base_model_name_or_path")
        except QmergeError:
            named = None
        if isinstance(named, str) and named:
            base = next((b for b in (Path(named), Path(adapter) / named) if b.is_dir()), None)
    if base is not None:
        paths.append(Path(base))
    return Inputs([p for p in paths if p.is_dir()], [p for p in paths if not p.is_dir()])


def not_a_report(path: Path) -> str | None:
    """Why `path` is not a report qmerge wrote (None when it is one: --force may replace it)."""
    if not path.is_file():
        return "it is not a file"
    with open(path, "rb") as f:
        head = f.read(len(MARKER) + 3)
    return (
        None
        if head.decode("utf-8", "replace").lstrip("\ufeff").startswith(MARKER)
        else ("it is not a report qmerge wrote")
    )


def check_report_path(path: Path, force: bool = False, inputs: Inputs = Inputs()) -> None:
    """Refuse a report path now (before the check runs) that write_report would refuse."""
    check_output(Path(path), force, inputs, not_a_report)


def write_report(report, path: Path, force: bool = False, inputs: Inputs = Inputs()) -> None:
    """Write `report` (a CheckReport or a merge-bases report) to path (.html or .md), atomically, as every
    output: never over an input, over an existing file only with `force` and only over a report qmerge wrote."""
    sections = _sections(report.to_json())
    text = _html(sections) if Path(path).suffix == ".html" else _markdown(sections)
    with atomic_file(Path(path), force, inputs, not_a_report) as tmp:
        tmp.write_text(MARKER + "\n" + text, encoding="utf-8")


def _sections(r: dict) -> list[tuple[str, list[tuple[str, str]] | str]]:
    """(title, rows or preformatted text) in reading order."""
    out: list = []
    if "routes" in r:
        for route, v in r["routes"].items():
            out.append(
                (f"merge into {route}: against the unmerged model", _metric_rows(v["vs_unmerged"]["metrics"]))
            )
            out.append(
                (f"merge into {route}: against the base model (text)", _metric_rows(v["vs_base"]["metrics"]))
            )
        out.append(("recommendation", [("--merge-base", r["recommendation"]), ("why", r["reason"])]))
        return out
    verdict = "PASSED" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
    out.append(("verdict", [("candidate", f"{r['candidate_kind']} {r['candidate']}"), ("result", verdict)]))
    out.append(("against the unmerged QLoRA model", _metric_rows(r["metrics"])))
    if r.get("quantization"):
        out.append(
            (
                "the base's quantization (as training saw it)",
                [(k, str(v)) for k, v in r["quantization"].items()],
            )
        )
    probe = r.get("quantization_probe")
    if probe:
        rows = [("verdict", probe["message"])] + [
            (
                f"{s['quant_type']}, {'double quant' if s['double_quant'] else 'no double quant'}, {s['dtype']}"
                + (" (used)" if i == 0 else ""),
                f"loss {s['loss']:.5f} per token, {s['gap']:.2e} above the best",
            )
            for i, s in enumerate(probe.get("settings", []))
        ]
        out.append(("quantization probe: the adapter's loss on the data under each 4-bit setting", rows))
    if r.get("warnings"):
        out.append(("warnings", [("", w) for w in r["warnings"]]))
    stats = r.get("llama_cpp") or {}
    if stats.get("n_tokens", 0) >= 2:
        out.append(("llama.cpp statistics (llama-perplexity --kl-divergence)", llama_cpp_lines(stats)))
        out.append(("per-token KLD", stats["kld_histogram"]))
    if r.get("task"):
        t = r["task"]
        out.append(
            (
                "greedy completions",
                [
                    (k, str(t[k]))
                    for k in ("prompts", "agreement", "accuracy_reference", "accuracy_candidate")
                ],
            )
        )
        diffs = [
            (
                c["prompt"],
                f"expected {c['expected']!r}; unmerged {c['reference']!r}; candidate {c['candidate']!r}",
            )
            for c in t["differing"]
        ]
        if diffs:
            out.append(("completions that differ", diffs))
        same = [(c["prompt"], _agreeing(c)) for c in t.get("agreeing", [])]
        if same:
            shown = f"{len(same)} of {t['prompts'] - len(diffs)}"
            out.append((f"completions that agree ({shown}): what both models answered", same))
    if r.get("against_base"):
        out.append(
            ("against the base model (no adapter), on text", _metric_rows(r["against_base"]["metrics"]))
        )
    layers = _retention_layers(r["candidate"])
    if layers:
        out.append(
            (
                "NF4 export: share of each layer's LoRA delta kept",
                [(k, f"{v['kept']:.1%}") for k, v in layers.items()],
            )
        )
    return out


def _agreeing(c: dict) -> str:
    expected = f"expected {c['expected']!r}; " if c.get("expected") is not None else ""
    return f"{expected}both {c['candidate']!r}"


def _metric_rows(m: dict) -> list[tuple[str, str]]:
    return [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in m.items()]


def _retention_layers(candidate: str) -> dict:
    path = Path(candidate)
    prov = read_provenance(path) if path.is_dir() else None
    return ((prov or {}).get("delta_retention") or {}).get("layers") or {}


def _bars(hist: dict) -> str:
    """The KLD histogram as text bars."""
    peak = max([*hist["counts"], hist["below"], hist["above"], 1])
    edges = hist["edges"]
    rows = [(f"< {edges[0]:.0e}", hist["below"])]
    rows += [(f"{lo:.0e}..{hi:.0e}", n) for lo, hi, n in zip(edges, edges[1:], hist["counts"], strict=False)]
    rows.append((f">= {edges[-1]:.0e}", hist["above"]))
    return "\n".join(f"{label:>16} {'#' * round(40 * n / peak)} {n}" for label, n in rows)


def _plot(hist: dict) -> str | None:
    """The histogram as an inline PNG (data: URL), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(hist["counts"])), hist["counts"])
    ax.set_xticks(range(0, len(hist["counts"]), 2), [f"{e:.0e}" for e in hist["edges"][:-1:2]], rotation=45)
    ax.set_xlabel("KLD per token")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _markdown(sections) -> str:
    out = ["# qmerge check", ""]
    for title, body in sections:
        out += [f"## {title}", ""]
        if isinstance(body, dict):
            out += ["```", _bars(body), "```", ""]
        else:
            out += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in body), ""]
    return "\n".join(out)


def _html(sections) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>qmerge check</title>", "<h1>qmerge check</h1>"]
    for title, body in sections:
        parts.append(f"<h2>{e(title)}</h2>")
        if isinstance(body, dict):
            img = _plot(body)
            parts.append(f"<img alt='KLD histogram' src='{img}'>" if img else f"<pre>{e(_bars(body))}</pre>")
        else:
            rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in body)
            parts.append(f"<table>{rows}</table>")
    return "\n".join(parts) + "\n"
