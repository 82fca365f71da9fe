"""`qmerge demo`: build a tiny Llama, fine-tune it with `qmerge train` on a lookup task it cannot do, merge,
export (NF4, GGUF q8_0 and q4_k_m) and score every variant on the same teacher-forced task sequences:
task accuracy, KL and top-1 agreement against the unmerged QLoRA model, and file size."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from .task import task_pairs, write_task
from .tiny import TinySpec, build_base

# init_std 0.1 makes the NF4 step coarse next to what 300 steps of LoRA learn, as it is for QLoRA
# fine-tunes of large models: the regime in which requantizing merges round the fine-tune away.
DEMO_SPEC = TinySpec(
    arch="llama",
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    seed=1234,
    init_std=0.1,
)
DEMO_STEPS = 300


@dataclass(frozen=True)
class Row:
    name: str
    accuracy: float
    mean_kl: float | None
    top1: float | None
    bytes: int | None
    path: str | None


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".gguf"))


def _quiet() -> None:
    """The demo's own six steps are the progress report; library bars and deprecation notices are noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fresh(out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise OutputError(f"{out} already exists; pass --force to replace it, or choose another -o.")
        if not (out / "demo.json").exists() and any(out.iterdir()):
            raise OutputError(f"{out} holds files the demo did not write; choose another -o.")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def fine_tune(base: Path, data: Path, adapter: Path, steps: int) -> dict:
    """QLoRA with `qmerge train`'s defaults (the QLoRA paper's: r=64, alpha=16, dropout 0.05, lr 2e-4
    constant, grad-norm 0.3); only the batch and the step count are the demo's."""
    from ..train.config import load_train_config
    from ..train.trainer import remove_checkpoints, train

    cfg = load_train_config(
        None,
        dict(
            base=base,
            data=data,
            output=adapter,
            max_steps=steps,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            save_steps=10_000,
            logging_steps=50,
            max_seq_length=64,
            seed=0,
            gradient_checkpointing=False,
        ),
    )
    trained = train(cfg, log=None)
    remove_checkpoints(adapter)
    return trained


def make_variants(out: Path, adapter: Path, base: Path, data: Path) -> dict:
    """The merge and the exports, by qmerge's own verbs: {label: WriteReport}."""
    from ..api import export, merge
    from ..formats.gguf import TensorTypes

    return {
        "qmerge merge (bf16)": merge(adapter, out / "merged-bf16", base=base, dtype="bf16"),
        "qmerge NF4 re-export": export(adapter, "nf4", out / "model-nf4", base=base),
        "qmerge NF4 calibrated": export(
            adapter, "nf4", out / "model-nf4-calibrated", base=base, calibrate=data
        ),
        "GGUF q8_0 (llama.cpp)": export(
            adapter, "gguf", out / "model-q8_0.gguf", base=base, gguf_type="q8_0"
        ),
        "GGUF q4_k_m (llama.cpp)": export(
            adapter, "gguf", out / "model-q4_k_m.gguf", base=base, gguf_type="q4_k_m"
        ),
        "GGUF IQ4_XS calibrated (qmerge)": export(
            adapter,
            "gguf",
            out / "model-iq4_xs-calibrated.gguf",
            base=base,
            gguf_type="iq4_xs",
            calibrate=data,
        ),
        "GGUF q4_k_m calibrated, Q8_0 embedding": export(
            adapter,
            "gguf",
            out / "model-q4_k_m-calibrated.gguf",
            base=base,
            gguf_type="q4_k_m",
            calibrate=data,
            tensor_types=TensorTypes(token_embedding="q8_0"),
        ),
        "GGUF q4_k_m base + LoRA GGUF": export(
            adapter, "gguf-lora", out / "lora-q4_k_m", base=base, gguf_type="q4_k_m"
        ),
        "GGUF q4_k_m calibrated base + LoRA": export(
            adapter,
            "gguf-lora",
            out / "lora-q4_k_m-calibrated",
            base=base,
            gguf_type="q4_k_m",
            calibrate=data,
        ),
    }


def _row(name: str, measured: tuple, path: Path | None) -> Row:
    metrics, task = measured
    size = _size(path) if path else None
    return Row(
        name,
        task["accuracy_candidate"],
        metrics.mean_kl,
        metrics.top1_agreement,
        size,
        str(path) if path else None,
    )


def score(out: Path, adapter: Path, base: Path, data: Path, variants: dict) -> tuple[list[Row], dict]:
    """Every variant against the unmerged QLoRA model with `qmerge check`'s own machinery, once: drift on
    the response tokens of the task data and greedy completions of all its prompts."""
    from ..pipeline.model import streamed_model
    from ..pipeline.source import Source, open_checkpoint
    from ..verify.candidates import candidate_kind
    from ..verify.check import Options, Runner, Session, task_summary
    from ..verify.generate import Completion

    n = len(task_pairs())
    opts = Options(data=data, generate=n, max_seqs=n, max_new_tokens=8, device="cpu")
    source = open_checkpoint(adapter, base)
    session = Session(source, opts, "cpu", None)

    def measure(runner: Runner) -> tuple:
        return session.measure(runner)[0], session.task(runner)

    naive_dir = out / "naive-merge-nf4"
    _save_naive(adapter, source.base, naive_dir)
    base_only = Runner("base", streamed_model(Source(source.base, None, source.quant, source.merge_base)))
    reference = task_summary(
        [Completion(p, a, r, r) for (_, p, a, _), r in zip(session.asked, session.ref_answers, strict=True)]
    )
    rows = [
        _row("base model (no adapter)", measure(base_only), None),
        Row("unmerged QLoRA (reference)", reference["accuracy_reference"], 0.0, 1.0, None, str(adapter)),
        _row("naive merge_and_unload (4-bit)", measure(session.candidate(naive_dir, "nf4")), naive_dir),
    ]
    gates = {}
    for label, report in variants.items():
        path, lora = Path(report.output), None
        if report.details.get("adapter"):  # gguf-lora: the base GGUF with the adapter applied
            path, lora = path / report.details["base"], path / report.details["adapter"]
        metrics, task = measure(session.candidate(path, candidate_kind(path), lora))
        rows.append(_row(label, (metrics, task), Path(report.output)))
        gates[label] = task["agreement"]
    session.close()
    return rows, gates


def _save_naive(adapter: Path, base_dir, out: Path) -> None:
    """Save what PEFT's merge_and_unload gives on the 4-bit model, to show its size on disk."""
    from peft import PeftModel

    from ..pipeline.model import quiet_libraries
    from ..pipeline.source import quant_settings_for
    from ..verify.reference import load_4bit_base

    with quiet_libraries():
        model = load_4bit_base(base_dir, quant_settings_for(None, None))
        PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(str(out))


def run_demo(
    out: Path, force: bool = False, steps: int | None = None, log: Callable[..., None] = print
) -> dict:
    """Build, train, merge, check and export; return the table's rows and the timings."""
    from ..verify.check import check

    _quiet()
    out = Path(out)
    _fresh(out, force)
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = time.perf_counter() - t
        t = time.perf_counter()

    log("1/6 building a tiny Llama base and its tokenizer (deterministic, no download)")
    base = build_base(out / "base", DEMO_SPEC)
    data = write_task(out / "data")
    lap("build")
    log("2/6 QLoRA fine-tune with qmerge train (NF4 + double quant, all-linear LoRA)")
    trained = fine_tune(base, data, out / "adapter", steps or DEMO_STEPS)
    lap("train")
    log(
        f"    loss {trained['first_loss']:.3f} -> {trained['last_loss']:.3f} in {trained['steps']} steps "
        f"({trained['seconds']:.0f} s)"
    )
    log("3/6 merging with qmerge (bf16, into the NF4 weights training saw)")
    log(
        "4/6 exporting NF4 (plain, calibrated on the task data), GGUF (q8_0, q4_k_m, calibrated IQ4_XS and "
        "q4_k_m) and LoRA GGUFs (on q4_k_m, on calibrated q4_k_m)"
    )
    variants = make_variants(out, out / "adapter", base, data)
    lap("merge_export")
    log("5/6 scoring every variant with qmerge check --data --generate against the unmerged QLoRA model")
    rows, agreement = score(out, out / "adapter", base, data, variants)
    lap("score")
    log("6/6 gate: qmerge check on the bf16 merge (exit code 0 means it passed)")
    gate = check(out / "adapter", out / "merged-bf16", base=base)
    timings["total"] = time.perf_counter() - t0
    retention = variants["qmerge NF4 re-export"].details.get("delta_retention") or {}
    result = {
        "output": str(out),
        "rows": [r.__dict__ for r in rows],
        "training": trained,
        "nf4_delta_retention": retention.get("total"),
        "check": gate.to_json(),
        "task_agreement": agreement,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


__all__ = ["run_demo", "DEMO_SPEC", "DEMO_STEPS"]
