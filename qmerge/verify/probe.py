"""The quantization probe: under which 4-bit settings the adapter fits the user's data best.

A QLoRA adapter is trained against one particular rounding of its base (NF4 or FP4, with or without double
quantization, from the dtype the base was loaded in), so on data like its training data the unmerged model's
loss is expected to be lowest under those settings. The probe computes that loss, streamed as check's
reference is (PEFT's LoRA layers over the reproduced 4-bit weights), under each plausible setting, and
compares the established quant type with the other: paired per record, so that a difference smaller
than the records' own spread is reported as undecided rather than as a finding. docs/cli.md gives its
measured accuracy: it tells NF4 from FP4; double quantization and the load dtype change the loss by too
little to tell, so those are reported and never decided.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import dtypes
from ..pipeline.base import QuantSettings
from ..pipeline.source import Source
from .streamed import logits, streamed_reference
from .tokens import Batch

# One quant type fits clearly better than the other when its best setting's mean loss is lower by more than
# this many standard errors of the paired per-record differences, and by more than MIN_GAP nats per token.
Z = 3.0
MIN_GAP = 1e-4
Progress = Callable[[str, int, int], None]


@dataclass
class ProbeResult:
    """Each setting's mean loss per scored token, the best one, and how the established one compares.

    The verdict is about the quant type (NF4 or FP4): double quantization and the load dtype move the loss
    by less than the probe can attribute (measured: docs/cli.md), so they are reported, never decided."""

    settings: list[dict]  # {quant_type, double_quant, dtype, loss, gap}: gap is the loss above the best's
    best: dict
    established: dict
    verdict: str  # "agrees": the established quant type fits best or within noise; "differs"; "undecided"
    records: int
    n_tokens: int

    def to_json(self) -> dict:
        return self.__dict__

    @property
    def message(self) -> str:
        est, best = self.established, self.best
        if self.verdict == "differs":
            return (
                f"quantization probe: on the --data records the adapter fits {best['quant_type']} clearly better "
                f"than the {est['quant_type']} this run used (loss {best['loss']:.5f} vs {est['loss']:.5f} per "
                f"token over {self.n_tokens} tokens, {self.records} records): training most likely used "
                f"{best['quant_type']}. Merge with --quant-type {best['quant_type']} (and --no-double-quant if "
                "training set only load_in_4bit=True, transformers' default; the probe cannot tell double "
                "quantization apart), or check what the training script's BitsAndBytesConfig said."
            )
        if self.verdict == "undecided":
            return (
                f"quantization probe: NF4 and FP4 fit the --data records equally well within noise "
                f"({self.records} records, {self.n_tokens} tokens); it cannot tell which one training used."
            )
        return (
            f"quantization probe: {est['quant_type']}, as used, fits the --data records best or within noise of "
            "the best (double quantization and the load dtype are not told apart by the loss)."
        )


def _label(s: dict) -> str:
    return f"{s['quant_type']}/{'double quant' if s['double_quant'] else 'no double quant'}/{s['dtype']}"


def plausible_settings(source: Source) -> list[QuantSettings]:
    """The established settings first, then NF4/FP4 x double quant x the base's load dtype (the dtype it is
    stored in, bf16 and fp16), the blocksize and storage as established."""
    q = source.quant
    stored = stored_dtype(source)
    first = replace(q, dtype=q.dtype or stored)
    loads = list(dict.fromkeys([first.dtype, stored, torch.bfloat16, torch.float16]))
    out = [first]
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            for dtype in loads:
                s = replace(q, quant_type=quant_type, double_quant=double_quant, dtype=dtype)
                if s not in out:
                    out.append(s)
    return out


def stored_dtype(source: Source) -> torch.dtype:
    """The dtype the base stores its quantizable weights in (the load dtype "auto" gives)."""
    names = source.weights.quantized_names()
    stored = {source.tensors[n].stored for n in names if n in source.tensors}
    return next(iter(stored)) if len(stored) == 1 else torch.float32


def record_losses(model, parts: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood of each record's scored next tokens, their count), fp64."""
    sums, counts = [], []
    for part in parts:
        out = logits(model, part.tokens, part.extra)
        known = part.scored & (part.targets >= 0)
        nll = torch.nn.functional.cross_entropy(
            out.transpose(1, 2).double(), part.targets.clamp(min=0), reduction="none"
        )
        sums.append((nll * known).sum(1))
        counts.append(known.sum(1).double())
    return torch.cat(sums), torch.cat(counts)


def probe_quantization(source: Source, parts: list[Batch], progress: Progress | None = None) -> ProbeResult:
    """Evaluate the unmerged model under each plausible setting on `parts` (the check's data batches)."""
    candidates = plausible_settings(source)
    per_record, count = [], None
    for i, q in enumerate(candidates):
        if progress:
            progress(f"quantization probe: {_label(_json(q))}", i, len(candidates))
        model = streamed_reference(Source(source.base, source.adapter, q, "dequantized"))
        sums, count = record_losses(model, parts)
        per_record.append(sums / count.clamp(min=1))
        del model
    losses = torch.stack(per_record)  # [settings, records]
    mean = (losses * count).sum(1) / count.sum()  # loss per scored token
    best = int(mean.argmin())
    settings = [
        {**_json(q), "loss": float(mean[i]), "gap": float(mean[i] - mean[best])}
        for i, q in enumerate(candidates)
    ]
    return ProbeResult(
        settings,
        settings[best],
        settings[0],
        _verdict(candidates, losses, mean),
        len(count),
        int(count.sum()),
    )


def _verdict(candidates: list[QuantSettings], losses: torch.Tensor, mean: torch.Tensor) -> str:
    """Whether the established quant type (candidates[0]'s) fits as well as the other: each type by its best
    setting, the difference paired per record and called only beyond Z standard errors and MIN_GAP."""
    kinds = [q.quant_type for q in candidates]

    def best_of(same: bool) -> int:
        idx = [i for i, k in enumerate(kinds) if (k == kinds[0]) == same]
        return min(idx, key=lambda i: float(mean[i]))

    ours, theirs = best_of(True), best_of(False)
    d = losses[ours] - losses[theirs]
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.inf
    gap = float(mean[ours] - mean[theirs])
    if abs(gap) <= max(Z * se, MIN_GAP):
        return "undecided"
    return "differs" if gap > 0 else "agrees"


def _json(q: QuantSettings) -> dict:
    return {
        "quant_type": q.quant_type,
        "double_quant": q.double_quant,
        "dtype": dtypes.config_name(q.dtype) if q.dtype is not None else None,
    }
