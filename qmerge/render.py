"""Rich renderings of qmerge's reports for people (the CLI prints them; --json prints the records)."""

from __future__ import annotations

import re
from itertools import groupby

from rich.table import Table

_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """layers.2 before layers.10: digit runs compare as numbers."""
    return [int(p) if p.isdigit() else p for p in _NUM.split(name)]


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, idx = [], sorted(set(indices))
    for _, run in groupby(enumerate(idx), key=lambda p: p[1] - p[0]):
        run = [v for _, v in run]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def group_modules(rows: list[dict], columns: tuple[str, ...]) -> list[tuple[str, int, str, dict]]:
    """Rows that differ only in their layer number, as (name with * for the layer, count, layers, row).

    Rows group when every column in `columns` agrees, so a rank_pattern that changes one layer shows as
    its own line. Natural order (layer 2 before layer 10).
    """
    groups: dict[tuple, list] = {}
    for row in sorted(rows, key=lambda r: natural_key(r["name"])):
        numbers = [int(n) for n in _NUM.findall(row["name"])]
        pattern = _NUM.sub("*", row["name"]) if numbers else row["name"]
        key = (pattern, *(str(row.get(c)) for c in columns))
        groups.setdefault(key, []).append((numbers[0] if numbers else None, row))
    out = []
    for (pattern, *_), members in groups.items():
        layers = [n for n, _ in members if n is not None]
        out.append((pattern, len(members), _spans(layers) if layers else "", members[0][1]))
    return sorted(out, key=lambda g: (natural_key(g[0]), natural_key(g[2])))


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def describe_tables(info: dict, per_module: bool = False) -> list:
    """The inspect report: a summary table, the modules (grouped by kind unless per_module), problems."""
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
    out = [t]
    mods = info.get("modules") or []
    if mods:
        out.append(_modules_table(mods, info.get("kind") == "gguf", per_module))
    return out


def _modules_table(mods: list[dict], gguf: bool, per_module: bool) -> Table:
    cols = ("shape", "type") if gguf else ("shape", "quantized", "lora_rank", "scaling")
    heads = {
        "shape": "shape",
        "type": "type",
        "quantized": "4-bit",
        "lora_rank": "LoRA r",
        "scaling": "scaling",
    }
    if per_module:
        m = Table(title=f"{len(mods)} {'tensors' if gguf else 'modules'}")
        m.add_column("tensor" if gguf else "module")
        for c in cols:
            m.add_column(heads[c], justify="right" if c in ("lora_rank", "scaling") else "left")
        for row in sorted(mods, key=lambda r: natural_key(r["name"])):
            m.add_row(row["name"], *(_cell(row, c) for c in cols))
        return m
    groups = group_modules(mods, cols)
    m = Table(
        title=f"{len(mods)} {'tensors' if gguf else 'modules'} in {len(groups)} kinds (--modules: one row each)"
    )
    m.add_column("tensor" if gguf else "module")
    m.add_column("count", justify="right")
    m.add_column("layers")
    for c in cols:
        m.add_column(heads[c], justify="right" if c in ("lora_rank", "scaling") else "left")
    for pattern, count, layers, row in groups:
        m.add_row(pattern, str(count), layers, *(_cell(row, c) for c in cols))
    return m


def _cell(row: dict, col: str) -> str:
    if col == "scaling":
        return _fmt(row.get("scaling"), ".4g")
    if col == "lora_rank":
        if row.get("replaced_by_adapter"):
            return "replaced"
        if row.get("trainable_tokens"):
            return f"{row['trainable_tokens']} tokens"
        return _fmt(row.get("lora_rank") or None)
    return _fmt(row.get(col))


def files_table(report) -> Table:
    t = Table(title=f"wrote {report.output}", show_lines=False)
    t.add_column("file")
    t.add_column("bytes", justify="right")
    t.add_column("sha256")
    for f in report.files:
        t.add_row(f.path, f"{f.bytes:,}", f.sha256[:16] + "…")
    return t


def check_tables(report) -> list[Table]:
    """The check report: the contract's metrics, llama.cpp's statistics, the task, the drift from the base."""
    tables = [_metrics_table(report)]
    extra = report.extra
    if extra.get("llama_cpp", {}).get("n_tokens", 0) >= 2:
        tables.append(
            llama_cpp_table(
                extra["llama_cpp"], f"llama.cpp statistics ({extra['llama_cpp']['n_tokens']} tokens)"
            )
        )
    if extra.get("task"):
        tables.append(task_table(extra["task"]))
    if extra.get("against_base"):
        m = extra["against_base"]["metrics"]
        t = Table(title="the candidate against the base model (no adapter), on text")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("mean KL", f"{m['mean_kl']:.3g}")
        t.add_row("top-1 agreement", f"{m['top1_agreement']:.4f}")
        tables.append(t)
    if extra.get("quantization_probe", {}).get("settings"):
        tables.append(probe_table(extra["quantization_probe"]))
    return tables


def probe_table(probe: dict) -> Table:
    """Each 4-bit setting's loss on the data, the best first marked, and the probe's verdict."""
    t = Table(title=f"quantization probe ({probe['records']} records, {probe['n_tokens']} tokens)")
    for col in ("quant type", "double quant", "load dtype", "loss per token", "above best"):
        t.add_column(col, justify="right" if col.startswith(("loss", "above")) else "left")
    for i, s in enumerate(probe["settings"]):
        t.add_row(
            s["quant_type"] + (" (used)" if i == 0 else ""),
            "yes" if s["double_quant"] else "no",
            str(s["dtype"]),
            f"{s['loss']:.5f}",
            f"{s['gap']:.2e}",
        )
    t.caption = probe["message"]
    return t


def _metrics_table(report) -> Table:
    where = f"on the response tokens of {report.extra['data']}" if report.extra.get("data") else "on text"
    t = Table(title=f"{report.candidate_kind} candidate {report.candidate} vs unmerged QLoRA model, {where}")
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
    if report.metrics.ppl_reference is None:  # a classifier: no next token, no perplexity
        rename = {"max |logit diff|": "max |class logit diff|", "tokens": "positions"}
        rows = [(rename.get(label, label), key, fmt) for label, key, fmt in rows if not key.startswith("ppl")]
    for label, key, fmt in rows:
        cells = [fmt.format(getattr(report.metrics, key))]
        if report.naive is not None:
            cells.append(fmt.format(getattr(report.naive, key)))
        t.add_row(label, *cells)
    return t


def llama_cpp_lines(s: dict) -> list[tuple[str, str]]:
    """llama-perplexity --kl-divergence's lines, as it prints them (probabilities in %)."""
    rows = [
        ("Mean PPL(Q)", f"{s['ppl_q']:.6f} ± {s['ppl_q_uncertainty']:.6f}"),
        ("Mean PPL(base)", f"{s['ppl_base']:.6f} ± {s['ppl_base_uncertainty']:.6f}"),
        ("Cor(ln(PPL(Q)), ln(PPL(base)))", f"{100 * s['cor_ln_ppl']:.2f}%"),
        (
            "Mean ln(PPL(Q)/PPL(base))",
            f"{s['mean_ln_ppl_ratio']:.6f} ± {s['mean_ln_ppl_ratio_uncertainty']:.6f}",
        ),
        ("Mean PPL(Q)/PPL(base)", f"{s['ppl_ratio']:.6f} ± {s['ppl_ratio_uncertainty']:.6f}"),
        ("Mean    KLD", f"{s['mean_kld']:.6f} ± {s['mean_kld_uncertainty']:.6f}"),
        ("Maximum KLD", f"{s['max_kld']:.6f}"),
    ]
    rows += [(f"{name:<7} KLD", f"{v:.6f}") for name, v in s["kld_percentiles"].items()]
    rows += [
        ("Minimum KLD", f"{s['min_kld']:.6f}"),
        ("Mean    Δp", f"{100 * s['mean_dp']:.3f} ± {100 * s['mean_dp_uncertainty']:.3f} %"),
        ("Maximum Δp", f"{100 * s['max_dp']:.3f}%"),
        ("Minimum Δp", f"{100 * s['min_dp']:.3f}%"),
        ("RMS Δp", f"{100 * s['rms_dp']:.3f} ± {100 * s['rms_dp_uncertainty']:.3f} %"),
        ("Same top p", f"{100 * s['same_top_p']:.3f} ± {100 * s['same_top_p_uncertainty']:.3f} %"),
    ]
    return rows


def llama_cpp_table(stats: dict, title: str) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("statistic")
    t.add_column("value", justify="right")
    for k, v in llama_cpp_lines(stats):
        t.add_row(k, v)
    return t


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def task_table(task: dict) -> Table:
    t = Table(title=f"greedy completions of {task['prompts']} prompts")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("candidate's completions equal to the unmerged model's", _pct(task["agreement"]))
    t.add_row("unmerged model: completions equal to the data's answers", _pct(task["accuracy_reference"]))
    t.add_row("candidate: completions equal to the data's answers", _pct(task["accuracy_candidate"]))
    for c in task["differing"][:5]:
        t.add_row(f"differs: {c['prompt'][-40:]!r}", f"{c['reference'][:30]!r} -> {c['candidate'][:30]!r}")
    return t


def bases_table(report) -> Table:
    """--compare-merge-bases: both routes side by side, and the recommendation."""
    t = Table(title=f"merge bases, measured on {report.measured_on}")
    t.add_column("measure")
    for r in report.routes:
        t.add_column(f"merge into {r}", justify="right")
    rows = [
        ("mean KL vs unmerged", "vs_unmerged", "mean_kl", "{:.3g}"),
        ("top-1 vs unmerged", "vs_unmerged", "top1_agreement", "{:.4f}"),
        ("max |logit diff| vs unmerged", "vs_unmerged", "max_abs_logit_diff", "{:.3g}"),
        ("mean KL vs base (text)", "vs_base", "mean_kl", "{:.3g}"),
        ("top-1 vs base (text)", "vs_base", "top1_agreement", "{:.4f}"),
    ]
    for label, part, key, fmt in rows:
        t.add_row(label, *(fmt.format(v[part]["metrics"][key]) for v in report.routes.values()))
    t.caption = f"recommended: --merge-base {report.recommendation}: {report.reason}"
    return t


def demo_table(result: dict) -> Table:
    """The demo's table: what each deployment kept of the fine-tune."""
    t = Table(title="qmerge demo: what each deployment kept of the fine-tune (task: 24 code words)")
    for col in (
        "variant",
        "task accuracy",
        "mean KL vs unmerged",
        "top-1 vs unmerged",
        "size",
    ):  # KL, top-1: answers
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in result["rows"]:
        size = f"{r['bytes'] / 1e6:.2f} MB" if r["bytes"] else "-"
        kl = f"{r['mean_kl']:.2e}" if r["mean_kl"] is not None else "-"
        top1 = f"{r['top1']:.3f}" if r["top1"] is not None else "-"
        t.add_row(r["name"], f"{r['accuracy']:.0%}", kl, top1, size)
    ret = result.get("nf4_delta_retention")
    cap = [f"outputs in {result['output']}; total {result['timings_s']['total']:.0f} s"]
    if ret is not None:
        cap.append(f"NF4 re-export kept {ret:.0%} of the LoRA delta")
    cap.append("qmerge check on the bf16 merge: " + ("PASSED" if result["check"]["passed"] else "FAILED"))
    gates = [
        f"{name.split(' (')[0]} {'passes' if a >= 0.95 else 'fails'} ({a:.0%})"
        for name, a in (result.get("task_agreement") or {}).items()
    ]
    if gates:
        cap.append(
            "--min-task-agreement 0.95 (completions equal to the unmerged model's): " + ", ".join(gates)
        )
    t.caption = "; ".join(cap)
    return t
