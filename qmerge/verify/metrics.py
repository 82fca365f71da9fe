"""Drift statistics of candidate logits against reference logits, accumulated a chunk of positions at a
time (pure tensor code)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Thresholds:
    """Limits for the gate; None disables one. max_kl bounds the mean KL over positions."""

    max_kl: float | None = 0.01
    min_top1: float | None = 0.95
    max_abs_diff: float | None = None


@dataclass(frozen=True)
class Metrics:
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    ppl_reference: float
    ppl_candidate: float
    n_tokens: int


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


class Drift:
    """Statistics of candidate vs reference over positions added in chunks of [n, vocab] logits.

    Per position: KL(reference || candidate), whether the top tokens agree, |logit difference|, and, where
    the next token is known, both models' negative log-likelihood of it.
    """

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.same_top: list[torch.Tensor] = []
        self.nll_ref: list[torch.Tensor] = []
        self.nll_cand: list[torch.Tensor] = []
        self.max_abs = 0.0

    def add(
        self, reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor | None = None
    ) -> None:
        """reference, candidate: [n, vocab] logits of the same n positions; targets: [n] next tokens, -1
        where there is none."""
        if reference.shape != candidate.shape:
            raise InputError(
                f"the candidate gives {candidate.shape[-1]} logits per token, the unmerged model "
                f"{reference.shape[-1]}: the candidate has another vocabulary, so it is not this fine-tune's "
                "model. Check --candidate."
            )
        ref, cand = log_softmax64(reference), log_softmax64(candidate)
        self.kl.append((ref.exp() * (ref - cand)).sum(-1))
        self.same_top.append(reference.argmax(-1) == candidate.argmax(-1))
        self.max_abs = max(
            self.max_abs, float((reference.double() - candidate.double()).abs().max()) if len(ref) else 0.0
        )
        if targets is not None:
            known = targets >= 0
            idx = targets[known].unsqueeze(-1)
            self.nll_ref.append(-ref[known].gather(-1, idx).squeeze(-1))
            self.nll_cand.append(-cand[known].gather(-1, idx).squeeze(-1))

    def metrics(self) -> Metrics:
        kl = torch.cat(self.kl)
        nll_ref = torch.cat(self.nll_ref) if self.nll_ref else torch.zeros(0, dtype=torch.float64)
        nll_cand = torch.cat(self.nll_cand) if self.nll_cand else torch.zeros(0, dtype=torch.float64)
        return Metrics(
            max_abs_logit_diff=self.max_abs,
            mean_kl=float(kl.mean().clamp(min=0)),
            max_kl=float(kl.max().clamp(min=0)),
            top1_agreement=float(torch.cat(self.same_top).double().mean()),
            ppl_reference=math.exp(float(nll_ref.mean())) if len(nll_ref) else float("nan"),
            ppl_candidate=math.exp(float(nll_cand.mean())) if len(nll_cand) else float("nan"),
            n_tokens=int(kl.numel()),
        )


def next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[n, seq] token ids -> [n, seq] the token each position predicts (-1 at the last position)."""
    out = torch.full_like(tokens, -1)
    out[:, :-1] = tokens[:, 1:]
    return out


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> Metrics:
    """Drift metrics of candidate vs reference logits [batch, seq, vocab] on `tokens` [batch, seq]."""
    drift = Drift()
    vocab = reference.shape[-1]
    drift.add(reference.reshape(-1, vocab), candidate.reshape(-1, vocab), next_tokens(tokens).reshape(-1))
    return drift.metrics()


def gate(metrics: Metrics, t: Thresholds) -> list[str]:
    """The thresholds the metrics cross, as readable lines (empty: passed)."""
    failures = []
    if t.max_kl is not None and metrics.mean_kl > t.max_kl:
        failures.append(f"mean KL {metrics.mean_kl:.3g} > --max-kl {t.max_kl:g}")
    if t.min_top1 is not None and metrics.top1_agreement < t.min_top1:
        failures.append(f"top-1 agreement {metrics.top1_agreement:.4f} < --min-top1 {t.min_top1:g}")
    if t.max_abs_diff is not None and metrics.max_abs_logit_diff > t.max_abs_diff:
        failures.append(
            f"max |logit diff| {metrics.max_abs_logit_diff:.3g} > --max-abs-diff {t.max_abs_diff:g}"
        )
    return failures
