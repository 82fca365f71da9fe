"""The drift metrics and llama.cpp's statistics against an independent computation (numpy, float64, the
formulas written out as llama-perplexity's documentation states them) on the same tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmerge.verify.metrics import Drift, compare_logits, next_tokens


def _independent(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict:
    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    lr, lc = log_softmax(ref.astype(np.float64)), log_softmax(cand.astype(np.float64))
    known = targets >= 0
    kld = (np.exp(lr) * (lr - lc)).sum(-1)[known]
    rows = np.nonzero(known)[0]
    nll_r, nll_c = -lr[rows, targets[known]], -lc[rows, targets[known]]
    n = len(kld)
    dp = np.exp(-nll_c) - np.exp(-nll_r)
    same = (ref.argmax(-1) == cand.argmax(-1))[known].astype(np.float64)
    p = same.mean()
    diff = nll_c - nll_r
    return {
        "mean_kld": kld.mean(),
        "mean_kld_uncertainty": kld.std() / math.sqrt(n - 1),  # population std over sqrt(n - 1)
        "kld_percentiles": {
            "99.0%": np.quantile(kld, 0.99),
            "Median": np.quantile(kld, 0.5),
            "1.0%": np.quantile(kld, 0.01),
        },
        "same_top_p": p,
        "same_top_p_uncertainty": math.sqrt(p * (1 - p) / (n - 1)),
        "rms_dp": math.sqrt((dp * dp).mean()),
        "mean_dp": dp.mean(),
        "ppl_q": math.exp(nll_c.mean()),
        "ppl_base": math.exp(nll_r.mean()),
        "mean_ln_ppl_ratio": diff.mean(),
        "mean_ln_ppl_ratio_uncertainty": diff.std() / math.sqrt(n - 1),
        "ppl_ratio": math.exp(diff.mean()),
        "cor_ln_ppl": np.corrcoef(nll_c, nll_r)[0, 1],
        "n_tokens": n,
    }


def test_llama_cpp_statistics_agree_with_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 50, generator=g) * 3
    cand = ref + torch.randn(300, 50, generator=g) * 0.5
    targets = torch.randint(0, 50, (300,), generator=g)
    targets[::7] = -1  # positions without a next token
    drift = Drift()
    for s in range(0, 300, 64):  # added in chunks, as check adds them
        drift.add(ref[s : s + 64], cand[s : s + 64], targets[s : s + 64])
    got = drift.llama_cpp()
    want = _independent(ref.numpy(), cand.numpy(), targets.numpy())
    for key, value in want.items():
        if key == "kld_percentiles":
            for name, v in value.items():
                assert got[key][name] == pytest.approx(v, rel=1e-9, abs=1e-12), name
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert (
        sum(got["kld_histogram"]["counts"]) + got["kld_histogram"]["below"] + got["kld_histogram"]["above"]
        == got["n_tokens"]
    )


def test_contract_metrics_agree_with_torch_kl_div():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 10, 30, generator=g)
    cand = ref + 0.1 * torch.randn(2, 10, 30, generator=g)
    tokens = torch.randint(0, 30, (2, 10), generator=g)
    m = compare_logits(ref, cand, tokens)
    lr, lc = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    kl = torch.nn.functional.kl_div(lc, lr, log_target=True, reduction="none").sum(-1)
    assert m.mean_kl == pytest.approx(float(kl.mean()), rel=1e-12)
    assert m.max_kl == pytest.approx(float(kl.max()), rel=1e-12)
    nxt = next_tokens(tokens)
    nll = torch.nn.functional.cross_entropy(cand[:, :-1].reshape(-1, 30).double(), nxt[:, :-1].reshape(-1))
    assert m.ppl_candidate == pytest.approx(math.exp(float(nll)), rel=1e-9)
    assert m.n_tokens == 20 and m.top1_agreement == float((ref.argmax(-1) == cand.argmax(-1)).double().mean())


def _routes(deq: float, orig: float) -> dict:
    return {
        r: {"vs_unmerged": {"metrics": {"mean_kl": kl}}}
        for r, kl in (("dequantized", deq), ("original", orig))
    }


@pytest.mark.parametrize(
    "deq,orig,pick", [(3e-5, 0.13, "dequantized"), (0.13, 3e-5, "original"), (1.0e-3, 1.1e-3, "dequantized")]
)
def test_merge_base_recommendation_follows_the_data(deq, orig, pick):
    from qmerge.verify.bases import recommend

    route, reason = recommend(_routes(deq, orig))
    assert route == pick and f"{min(deq, orig):.3g}" in reason


def test_compare_merge_bases_needs_the_16bit_base(fixtures, base4):
    from qmerge.errors import InputError
    from qmerge.verify.bases import compare_merge_bases

    with pytest.raises(InputError, match="needs the 16-bit base"):
        compare_merge_bases(fixtures / "adapter-qlora", base4, None)
