"""`qmerge check`: the candidate's logits against the unmerged QLoRA model on the same tokens, and the gate."""

from __future__ import annotations

from pathlib import Path

from ..pipeline.base import QuantSettings
from ..pipeline.source import quant_settings_for
from ..reports import CheckReport
from .candidates import candidate_logits, delta_retention
from .metrics import Thresholds, compare_logits, gate
from .reference import model_logits, naive_merged_model, reference_model
from .tokens import load_tokenizer, make_tokens


def check(
    adapter: Path,
    candidate: Path,
    base: Path | None = None,
    thresholds: Thresholds = Thresholds(),
    text: str | None = None,
    seq_len: int = 128,
    max_seqs: int = 8,
    naive: bool = False,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
) -> CheckReport:
    """Compare a candidate with the unmerged QLoRA model on the same tokens and apply the thresholds."""
    ref_model, ad, base_dir = reference_model(Path(adapter), Path(base) if base else None, quant, merge_base)
    vocab = ref_model.get_input_embeddings().weight.shape[0]
    tokenizer = load_tokenizer(ad.path, base_dir.path)
    tokens = make_tokens(tokenizer, vocab, text, seq_len, max_seqs)
    reference = model_logits(ref_model, tokens)
    del ref_model
    cand, kind = candidate_logits(Path(candidate), tokens)
    metrics = compare_logits(reference, cand, tokens)
    naive_metrics = None
    if naive:
        model = naive_merged_model(ad, base_dir, quant_settings_for(ad, quant))
        naive_metrics = compare_logits(reference, model_logits(model, tokens), tokens)
    failures = gate(metrics, thresholds)
    return CheckReport(
        not failures,
        metrics,
        thresholds,
        str(candidate),
        kind,
        failures,
        naive_metrics,
        delta_retention(Path(candidate)),
    )
