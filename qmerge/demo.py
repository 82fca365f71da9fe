"""`qmerge demo`: the whole path on a built-in tiny model, on a CPU, in minutes.

A tiny Llama is built from a seed, fine-tuned with `qmerge train` on a lookup task it cannot do (code
words -> answers), then merged, checked, and exported to NF4 and GGUF. Every variant is scored on the
same teacher-forced task sequences: task accuracy (all answer tokens right), KL and top-1 agreement
against the unmerged QLoRA model, and file size.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import OutputError
from .tiny import TinySpec, build_base

KEYS = [
    "fox",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "sheep",
    "goat",
    "lion",
    "tiger",
    "bear",
    "wolf",
    "deer",
    "rabbit",
    "mouse",
    "snake",
    "frog",
    "red",
    "blue",
    "green",
    "pink",
    "grey",
    "black",
]
VALUES = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "Monday",
    "Tuesday",
    "Friday",
    "Sunday",
    "March",
    "April",
    "June",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "sigma",
]
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


def task_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """The demo's lookup task: each code word maps to an answer word (a fixed shuffle)."""
    values = VALUES[:]
    random.Random(seed).shuffle(values)
    return list(zip(KEYS, values, strict=True))


def write_task(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"code {k}"}, {"role": "assistant", "content": v}]}
        for k, v in task_pairs()
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def task_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced sequences [n, L] (right-padded) and a mask of the positions that predict answer tokens."""
    seqs, masks = [], []
    for k, v in task_pairs():
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"code {k}"}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(v + "<|end|>", add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
        # position t predicts token t+1: the answer tokens are predicted from len(p)-1 .. len(ids)-2
        mask = [0] * len(ids)
        for t in range(len(p_ids) - 1, len(ids) - 1):
            mask[t] = 1
        seqs.append(ids)
        masks.append(mask)
    n = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    tokens = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (n - len(m)) for m in masks], dtype=torch.bool)
    return tokens, mask


def task_accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of examples whose every answer token is the argmax prediction."""
    pred = logits.argmax(-1)
    target = torch.roll(tokens, -1, dims=1)
    ok = ((pred == target) | ~mask).all(dim=1)
    return float(ok.float().mean())


def masked_drift(reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || cand), top-1 agreement) over the answer positions."""
    ref = torch.log_softmax(reference.double(), -1)
    cand = torch.log_softmax(candidate.double(), -1)
    kl = (ref.exp() * (ref - cand)).sum(-1)[mask]
    top1 = (reference.argmax(-1) == candidate.argmax(-1))[mask]
    return float(kl.mean().clamp(min=0)), float(top1.double().mean())


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def run_demo(
    out: Path, force: bool = False, steps: int | None = None, log: Callable[..., None] = print
) -> dict:
    """Build, train, merge, check and export; return the table's rows and the timings."""
    import warnings

    from transformers.utils import logging as hf_logging

    from . import verify
    from .export import NF4Options, export
    from .merge import merge
    from .train.config import load_train_config
    from .train.trainer import remove_checkpoints, train

    # The demo's own six steps are the progress report; library bars and deprecation notices are noise here.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(out)
    if out.exists():
        if not force:
            raise OutputError(f"{out} already exists; pass --force to replace it, or choose another -o.")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    log("1/6 building a tiny Llama base and its tokenizer (deterministic, no download)")
    base = build_base(out / "base", DEMO_SPEC)
    data = write_task(out / "data")
    timings["build"] = time.perf_counter() - t0

    log("2/6 QLoRA fine-tune with qmerge train (NF4 + double quant, all-linear LoRA)")
    t = time.perf_counter()
    cfg = load_train_config(
        None,
        dict(
            # LoRA and optimiser settings are qmerge train's defaults (the QLoRA paper's: r=64, alpha=16,
            # dropout 0.05, lr 2e-4 constant, grad-norm 0.3); only the batch and the step count are the demo's.
            base=base,
            data=data,
            output=out / "adapter",
            max_steps=steps or DEMO_STEPS,
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
    remove_checkpoints(out / "adapter")
    adapter = out / "adapter"
    timings["train"] = time.perf_counter() - t
    log(
        f"    loss {trained['first_loss']:.3f} -> {trained['last_loss']:.3f} in {trained['steps']} steps ({trained['seconds']:.0f} s)"
    )

    log("3/6 merging with qmerge (bf16, into the NF4 weights training saw)")
    t = time.perf_counter()
    merged = merge(adapter, out / "merged-bf16", base=base, dtype="bf16")
    timings["merge"] = time.perf_counter() - t

    log("4/6 exporting NF4 and GGUF (q8_0, q4_k_m)")
    t = time.perf_counter()
    nf4 = export(adapter, "nf4", out / "model-nf4", base=base, nf4=NF4Options())
    q8 = export(adapter, "gguf", out / "model-q8_0.gguf", base=base, gguf_type="q8_0")
    q4 = export(adapter, "gguf", out / "model-q4_k_m.gguf", base=base, gguf_type="q4_k_m")
    timings["export"] = time.perf_counter() - t

    log("5/6 scoring every variant on the task against the unmerged QLoRA model")
    t = time.perf_counter()
    tokenizer = verify.load_tokenizer(base)
    tokens, mask = task_batch(tokenizer)
    ref_model, ad, base_dir = verify.reference_model(adapter, base)
    reference = verify.model_logits(ref_model, tokens)
    with ref_model.disable_adapter():
        base_only = verify.model_logits(ref_model, tokens)
    del ref_model
    naive_dir = out / "naive-merge-nf4"
    naive_model = verify.naive_merged_model(ad, base_dir, verify.quant_settings_for(base_dir, ad, None))
    naive = verify.model_logits(naive_model, tokens)
    rows = [
        Row(
            "base model (no adapter)",
            task_accuracy(base_only, tokens, mask),
            *masked_drift(reference, base_only, mask),
            None,
            None,
        ),
        Row(
            "unmerged QLoRA (reference)", task_accuracy(reference, tokens, mask), 0.0, 1.0, None, str(adapter)
        ),
    ]
    _save_naive(adapter, base_dir, naive_dir)
    rows.append(
        Row(
            "naive merge_and_unload (4-bit)",
            task_accuracy(naive, tokens, mask),
            *masked_drift(reference, naive, mask),
            _size(naive_dir),
            str(naive_dir),
        )
    )
    for label, report in (
        ("qmerge merge (bf16)", merged),
        ("qmerge NF4 re-export", nf4),
        ("GGUF q8_0 (llama.cpp)", q8),
        ("GGUF q4_k_m (llama.cpp)", q4),
    ):
        logits, _kind = verify.candidate_logits(Path(report.output), tokens)
        rows.append(
            Row(
                label,
                task_accuracy(logits, tokens, mask),
                *masked_drift(reference, logits, mask),
                _size(Path(report.output)),
                report.output,
            )
        )
    timings["score"] = time.perf_counter() - t

    log("6/6 gate: qmerge check on the bf16 merge (exit code 0 means it passed)")
    gate = verify.check(adapter, out / "merged-bf16", base=base)
    timings["total"] = time.perf_counter() - t0
    retention = nf4.details.get("delta_retention") or {}
    result = {
        "output": str(out),
        "rows": [r.__dict__ for r in rows],
        "training": trained,
        "nf4_delta_retention": retention.get("total"),
        "check": gate.to_json(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _save_naive(adapter: Path, base_dir, out: Path) -> None:
    """Save what PEFT's merge_and_unload gives on the 4-bit model, to show its size on disk."""
    from . import verify

    q = verify.quant_settings_for(base_dir, None, None)
    with verify.quiet_libraries():
        from peft import PeftModel

        model = PeftModel.from_pretrained(verify.load_4bit_base(base_dir, q), str(adapter)).merge_and_unload()
        model.save_pretrained(str(out))


def render_table(result: dict):
    """The demo's table as a rich Table."""
    from rich.table import Table

    t = Table(title="qmerge demo: what each deployment kept of the fine-tune (task: 24 code words)")
    for col in ("variant", "task accuracy", "mean KL vs unmerged", "top-1 vs unmerged", "size"):
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
    t.caption = "; ".join(cap)
    return t
