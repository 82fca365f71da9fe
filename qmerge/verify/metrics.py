"""Drift statistics of candidate logits against reference logits, accumulated a chunk of positions at a
time (pure tensor code): the contract's metrics, and llama.cpp's (`llama-perplexity --kl-divergence`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError, OptionError

_SLICE = 1 << 21  # elements of [positions, vocab] in one float64 temporary (16 MiB)
# KLD percentiles llama-perplexity prints (as fractions), with the names it prints them under.
PERCENTILES = (
    ("99.9%", 0.999),
    ("99.0%", 0.99),
    ("95.0%", 0.95),
    ("90.0%", 0.90),
    ("Median", 0.5),
    ("10.0%", 0.10),
    ("5.0%", 0.05),
    ("1.0%", 0.01),
    ("0.1%", 0.001),
)


@dataclass(frozen=True)
class Thresholds:
    """Limits for the gate; None disables one. max_kl bounds the mean KL over positions; min_task_agreement
    the share of completions (--generate) that equal the reference's."""

    max_kl: float | None = 0.01
    min_top1: float | None = 0.95
    max_abs_diff: float | None = None
    min_task_agreement: float | None = None

    def __post_init__(self):
        # a NaN or out-of-range limit would switch the gate off: refused, as the CLI refuses it
        for name, hi in (
            ("max_kl", math.inf),
            ("min_top1", 1.0),
            ("max_abs_diff", math.inf),
            ("min_task_agreement", 1.0),
        ):
            check_range(name, getattr(self, name), 0.0, hi, optional=True)


def check_range(name: str, value, lo: float, hi: float, optional: bool = False) -> None:
    """Raise an OptionError unless `value` is a finite number in [lo, hi] (or None when `optional`)."""
    if value is None and optional:
        return
    bound = f"between {lo:g} and {hi:g}" if math.isfinite(hi) else f"at least {lo:g}"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise OptionError(f"{name} must be a finite number {bound}, got {value!r}.")


@dataclass(frozen=True)
class Metrics:
    """The contract's check metrics (CONTRACT.md)."""

    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    ppl_reference: float | None  # None where no next token is known (a sequence classifier's check)
    ppl_candidate: float | None
    n_tokens: int


def log_softmax64(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def _mean_err(x: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error, sqrt(var / (n - 1)), as llama-perplexity reports them."""
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, float("nan")
    var = float((x * x).mean()) - mean * mean
    return mean, math.sqrt(max(var, 0.0) / (n - 1))


def percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation between the two nearest ranks."""
    n = sorted_values.numel()
    p = fraction * (n - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, n - 1)])


class Drift:
    """Statistics of candidate vs reference over positions added in chunks of [n, vocab] logits.

    Per position: KL(reference || candidate), whether the top tokens agree, |logit difference|, and, where
    the next token is known, both models' negative log-likelihood of it and the change in its probability.
    """

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.same_top: list[torch.Tensor] = []
        self.nll_ref: list[torch.Tensor] = []
        self.nll_cand: list[torch.Tensor] = []
        self.kl_known: list[torch.Tensor] = []
        self.same_known: list[torch.Tensor] = []
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
        step = max(1, _SLICE // max(1, reference.shape[-1]))  # float64 temporaries of a few positions
        for s in range(0, len(reference), step):
            t = None if targets is None else targets[s : s + step]
            self._add(reference[s : s + step], candidate[s : s + step], t)

    def _add(self, reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor | None) -> None:
        ref, cand = log_softmax64(reference), log_softmax64(candidate)
        kl = (ref.exp() * (ref - cand)).sum(-1)
        same = reference.argmax(-1) == candidate.argmax(-1)
        self.kl.append(kl)
        self.same_top.append(same)
        if len(ref):
            self.max_abs = max(self.max_abs, float((reference.double() - candidate.double()).abs().max()))
        if targets is not None:
            known = targets >= 0
            idx = targets[known].unsqueeze(-1)
            self.nll_ref.append(-ref[known].gather(-1, idx).squeeze(-1))
            self.nll_cand.append(-cand[known].gather(-1, idx).squeeze(-1))
            self.kl_known.append(kl[known])
            self.same_known.append(same[known])

    def metrics(self) -> Metrics:
        kl = torch.cat(self.kl)
        if not kl.numel():
            raise InputError("there are no tokens to compare on; give longer text or data with responses.")
        nll_ref, nll_cand = self._nll()
        return Metrics(
            max_abs_logit_diff=self.max_abs,
            mean_kl=float(kl.mean().clamp(min=0)),
            max_kl=float(kl.max().clamp(min=0)),
            top1_agreement=float(torch.cat(self.same_top).double().mean()),
            ppl_reference=math.exp(float(nll_ref.mean())) if len(nll_ref) else None,
            ppl_candidate=math.exp(float(nll_cand.mean())) if len(nll_cand) else None,
            n_tokens=int(kl.numel()),
        )

    def _nll(self) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros(0, dtype=torch.float64)
        return (
            torch.cat(self.nll_ref) if self.nll_ref else empty,
            torch.cat(self.nll_cand) if self.nll_cand else empty,
        )

    def llama_cpp(self) -> dict:
        """The statistics `llama-perplexity --kl-divergence` prints, over the positions whose next token is
        known (probabilities as fractions; Δp is the change in the probability of that next token)."""
        nll_ref, nll_cand = self._nll()
        n = nll_ref.numel()
        if n < 2:
            return {"n_tokens": n}
        kld = torch.cat(self.kl_known)
        dp = (-nll_cand).exp() - (-nll_ref).exp()
        same = torch.cat(self.same_known).double()
        ln_ratio = nll_cand - nll_ref
        out = {"n_tokens": n}
        out["mean_kld"], out["mean_kld_uncertainty"] = _mean_err(kld)
        ordered = kld.sort().values
        out["max_kld"], out["min_kld"] = float(ordered[-1]), float(ordered[0])
        out["kld_percentiles"] = {name: percentile(ordered, f) for name, f in PERCENTILES}
        p = float(same.mean())
        out["same_top_p"], out["same_top_p_uncertainty"] = p, math.sqrt(p * (1 - p) / (n - 1))
        out["mean_dp"], out["mean_dp_uncertainty"] = _mean_err(dp)
        out["max_dp"], out["min_dp"] = float(dp.max()), float(dp.min())
        ms, ms_err = _mean_err(dp * dp)
        out["rms_dp"] = math.sqrt(ms)
        out["rms_dp_uncertainty"] = ms_err / (2 * out["rms_dp"]) if out["rms_dp"] > 0 else 0.0
        for name, nll in (("ppl_q", nll_cand), ("ppl_base", nll_ref)):
            mean, err = _mean_err(nll)
            out[name], out[name + "_uncertainty"] = math.exp(mean), math.exp(mean) * err
        out["mean_ln_ppl_ratio"], out["mean_ln_ppl_ratio_uncertainty"] = _mean_err(ln_ratio)
        out["ppl_ratio"] = math.exp(out["mean_ln_ppl_ratio"])
        out["ppl_ratio_uncertainty"] = out["ppl_ratio"] * out["mean_ln_ppl_ratio_uncertainty"]
        out["cor_ln_ppl"] = _correlation(nll_cand, nll_ref)
        out["kld_histogram"] = histogram(kld)
        return out


def histogram(kld: torch.Tensor) -> dict:
    """Counts of per-token KLD in half-decade bins from 1e-8 to 1e2 (below and above counted apart)."""
    edges = [10 ** (e / 2) for e in range(-16, 5)]
    x = kld.double()
    counts = [int(((x >= lo) & (x < hi)).sum()) for lo, hi in zip(edges, edges[1:], strict=False)]
    return {
        "edges": edges,
        "counts": counts,
        "below": int((x < edges[0]).sum()),
        "above": int((x >= edges[-1]).sum()),
    }


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float((a * a).sum().sqrt() * (b * b).sum().sqrt())
    return float((a * b).sum()) / den if den > 0 else float("nan")


def next_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[n, seq] token ids -> [n, seq] the token each position predicts (-1 at the last position)."""
    out = torch.full_like(tokens, -1)
    out[:, :-1] = tokens[:, 1:]
    return out


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> Metrics:
    """Drift metrics of candidate vs reference logits [batch, seq, vocab] on `tokens` [batch, seq]."""
    drift = Drift()
    vocab = reference.shape[-1]
    drift.add(
        reference.reshape(-1, vocab),
        candidate.reshape(-1, candidate.shape[-1]),
        next_tokens(tokens).reshape(-1),
    )
    return drift.metrics()


def gate(metrics: Metrics, t: Thresholds, task_agreement: float | None = None) -> list[str]:
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
    if (
        t.min_task_agreement is not None
        and task_agreement is not None
        and task_agreement < t.min_task_agreement
    ):
        failures.append(
            f"task agreement {task_agreement:.4f} < --min-task-agreement {t.min_task_agreement:g}"
        )
    return failures
