"""Drift check: logits of a candidate (merged dir, NF4 export, GGUF) against the unmerged QLoRA model.

The reference is computed by transformers + bitsandbytes + PEFT, never by qmerge's merge code: the base
is loaded with a BitsAndBytesConfig (quantized by bitsandbytes itself, or read from a 4-bit checkpoint),
its Linear4bit layers are dequantized by bitsandbytes (transformers' model.dequantize(), before any
forward, which sidesteps the CPU repacking gotcha), the model is cast to fp32, and PEFT runs the adapter
unmerged on top. Merge error is then not hidden under bf16 compute noise.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import DependencyError, InputError, UnsupportedError
from .io.adapter import Adapter
from .io.checkpoint import ModelDir
from .native import quiet_native_stderr
from .plan import QuantSettings, quant_settings_for, resolve_base_path

DEFAULT_TEXT = (
    "QLoRA fine-tunes a large language model cheaply: the base weights are frozen in 4-bit NormalFloat, and "
    "small LoRA matrices are trained on every linear layer. After training, the adapter is merged into the "
    "base and the model is exported for deployment. The quick brown fox jumps over the lazy dog. "
    "Question: what is the capital of France? Answer: Paris. One, two, three, four, five, six, seven. "
    "User: hello there. Assistant: hello, how can I help you today? Red orange yellow green blue indigo."
)


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


@dataclass(frozen=True)
class CheckReport:
    passed: bool
    metrics: Metrics
    thresholds: Thresholds
    candidate: str
    candidate_kind: str
    failures: list[str]
    naive: Metrics | None = None
    delta_retention: float | None = None  # an NF4 export's share of the LoRA delta kept (from its provenance)

    def to_json(self) -> dict:
        out = {
            "passed": self.passed,
            "metrics": asdict(self.metrics),
            "thresholds": asdict(self.thresholds),
            "candidate": self.candidate,
            "candidate_kind": self.candidate_kind,
            "failures": self.failures,
        }
        if self.naive is not None:
            out["naive_merge"] = asdict(self.naive)
        if self.delta_retention is not None:
            out["delta_retention"] = self.delta_retention
        return out


# ---- metrics ------------------------------------------------------------------------------------------


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tokens: torch.Tensor) -> Metrics:
    """Drift metrics of candidate vs reference logits [batch, seq, vocab] on `tokens` [batch, seq]."""
    if reference.shape != candidate.shape:
        raise InputError(
            f"candidate logits have shape {list(candidate.shape)}, reference {list(reference.shape)}; the "
            "candidate has another vocabulary size."
        )
    ref = torch.log_softmax(reference.double(), dim=-1)
    cand = torch.log_softmax(candidate.double(), dim=-1)
    kl = (ref.exp() * (ref - cand)).sum(-1)  # KL(reference || candidate) per position
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).double()
    nxt = tokens[:, 1:].unsqueeze(-1)
    nll_ref = -ref[:, :-1].gather(-1, nxt).mean()
    nll_cand = -cand[:, :-1].gather(-1, nxt).mean()
    return Metrics(
        max_abs_logit_diff=float((reference.double() - candidate.double()).abs().max()),
        mean_kl=float(kl.mean().clamp(min=0)),
        max_kl=float(kl.max().clamp(min=0)),
        top1_agreement=float(top1.mean()),
        ppl_reference=float(math.exp(nll_ref)),
        ppl_candidate=float(math.exp(nll_cand)),
        n_tokens=int(tokens.numel()),
    )


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


# ---- tokens -------------------------------------------------------------------------------------------


def load_tokenizer(*dirs: Path):
    """The first transformers tokenizer found in dirs, or None."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and (Path(d) / "tokenizer_config.json").exists():
            with quiet_libraries():
                return AutoTokenizer.from_pretrained(str(d))
    return None


def make_tokens(
    tokenizer, vocab_size: int, text: str | None, seq_len: int = 128, max_seqs: int = 8
) -> torch.Tensor:
    """Token id sequences [n, seq_len] from text (or the built-in text), or seeded random ids without a tokenizer."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (min(max_seqs, 4), seq_len), generator=g)
    ids = tokenizer(text or DEFAULT_TEXT, add_special_tokens=False)["input_ids"]
    ids = [i for i in ids if i < vocab_size]
    if len(ids) < 2:
        raise InputError("the text gives fewer than 2 tokens; pass a longer --text file.")
    seq_len = min(seq_len, len(ids))
    n = max(1, min(max_seqs, len(ids) // seq_len))
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


# ---- models -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_libraries():
    """Silence library chatter (progress bars, warnings) so that --json stdout stays clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            hf_logging.set_verbosity(level)


def model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, seq, vocab] of a transformers model for token ids [n, seq], one sequence at a time."""
    with torch.no_grad():
        return torch.cat([model(input_ids=tokens[i : i + 1]).logits.float() for i in range(len(tokens))])


def _bnb_config(q: QuantSettings, compute=torch.float32):
    from transformers import BitsAndBytesConfig

    if q.blocksize != 64:
        raise UnsupportedError(
            "transformers always quantizes with blocksize 64; a base trained otherwise cannot be reproduced."
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def load_4bit_base(base: ModelDir, quant: QuantSettings):
    """The base as transformers loads it for QLoRA: 4-bit Linear layers quantized by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    with quiet_libraries():
        if base.is_4bit:
            return AutoModelForCausalLM.from_pretrained(str(base.path), device_map="cpu")
        return AutoModelForCausalLM.from_pretrained(
            str(base.path),
            quantization_config=_bnb_config(quant),
            dtype=quant.dtype or "auto",
            device_map="cpu",
        )


def reference_model(
    adapter_path: Path,
    base_path: Path | None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
):
    """The unmerged QLoRA model in fp32, built by transformers, bitsandbytes and PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Adapter(adapter_path)
    base = ModelDir(resolve_base_path(adapter, base_path))
    q = quant_settings_for(base, adapter, quant)
    with quiet_libraries():
        if merge_base == "original":
            model = AutoModelForCausalLM.from_pretrained(str(base.path), dtype=torch.float32)
        else:
            model = load_4bit_base(base, q)
            model = model.dequantize()  # bitsandbytes' dequantize_4bit, in the quant_state dtype
            model = model.float()
        model = PeftModel.from_pretrained(model, str(adapter.path))
        model.eval()
    return model, adapter, base


def naive_merged_model(adapter: Adapter, base: ModelDir, quant: QuantSettings):
    """What users get from PEFT's merge_and_unload on the 4-bit model (the delta requantized to NF4)."""
    from peft import PeftModel

    with quiet_libraries():
        model = load_4bit_base(base, quant)
        model = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
        model = model.dequantize().float()
        model.eval()
    return model


def candidate_kind(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise InputError(f"{path}: not a GGUF file and not a model directory.")
    if not (path / "config.json").exists():
        raise InputError(
            f"{path}: no config.json; --candidate takes a merged directory, an NF4 export or a GGUF file."
        )
    if (path / "adapter_config.json").exists():
        raise InputError(
            f"{path}: is an adapter; --candidate takes a merged model, an NF4 export or a GGUF file."
        )
    cfg = ModelDir(path).quantization_config
    return "nf4" if cfg else "merged"


def candidate_logits(path: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of a candidate for `tokens`, by the engine that would serve it."""
    kind = candidate_kind(path)
    if kind == "gguf":
        return gguf_logits(path, tokens), kind
    from transformers import AutoModelForCausalLM

    with quiet_libraries():
        if kind == "nf4":
            model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
            model = model.dequantize().float()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        model.eval()
    return model_logits(model, tokens), kind


def gguf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Full logits from llama.cpp (llama-cpp-python) for each sequence, with an f32 KV cache."""
    try:
        import llama_cpp
    except ImportError as e:
        raise DependencyError(
            "checking a GGUF file needs llama-cpp-python: pip install llama-cpp-python."
        ) from e
    seq = tokens.shape[1]
    with quiet_native_stderr():
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=max(seq, 16),
            n_batch=max(seq, 16),
            logits_all=True,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
            n_threads=max(1, min(4, os.cpu_count() or 1)),
            verbose=False,
            seed=0,
        )
    outs = []
    try:
        for row in tokens.tolist():
            llm.reset()
            llm.eval(row)
            outs.append(torch.from_numpy(llm.scores[: len(row)].copy()))
    finally:
        llm.close()
    return torch.stack(outs)


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
        q = quant_settings_for(base_dir, ad, quant)
        naive_metrics = compare_logits(
            reference, model_logits(naive_merged_model(ad, base_dir, q), tokens), tokens
        )
    failures = gate(metrics, thresholds)
    return CheckReport(
        not failures,
        metrics,
        thresholds,
        str(candidate),
        kind,
        failures,
        naive_metrics,
        _retention_of(Path(candidate)),
    )


def _retention_of(candidate: Path) -> float | None:
    """The delta retention qmerge recorded when it wrote an NF4 export (None for other candidates)."""
    prov = candidate / "qmerge_provenance.json"
    if not prov.is_file():
        return None
    from .io.checkpoint import read_json

    return (read_json(prov).get("delta_retention") or {}).get("total")
