"""`qmerge check`: the candidate against the unmerged QLoRA model on the same tokens, and the gate.

Text (`--text`, else a built-in paragraph): every position scored. Data (`--data`, JSONL as `qmerge train`
reads): the positions that predict response tokens. `--generate N` also compares greedy completions of the
data's prompts; `--against-base` measures how far the candidate moved from the base model on text.

device "cpu" streams the models one module's weights at a time in fp32 (streamed.py); "cuda" runs them
whole on the GPU, the reference in the training's compute dtype unless fp32_reference (cuda.py); "auto"
picks cuda when there is one. Logits are computed a chunk of sequences at a time (LOGITS_BUDGET); the
reference's are kept (on disk beyond one chunk) until the candidate's are there. A GGUF candidate runs in
llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from .. import llama_cpp
from ..data import NoResponse, has_images, read_jsonl
from ..errors import UnsupportedError
from ..pipeline.base import QuantSettings
from ..pipeline.model import load_tokenizer, streamed_model
from ..pipeline.source import Source, open_checkpoint, open_source, quant_settings_for
from ..reports import CheckReport
from .candidates import candidate_kind, delta_retention
from .cuda import cuda_available, cuda_base, cuda_candidate, cuda_reference, require_cuda
from .generate import Completion
from .images import gguf_refusal, load_processor
from .metrics import Drift, Thresholds, gate
from .options import Options
from .reference import model_logits, naive_merged_model
from .runner import Progress, Runner, Spill, chunks
from .streamed import streamed_reference
from .tokens import Batch, data_batch, prompts, text_batch


def resolve_device(device: str) -> str:
    """auto: cuda when a CUDA GPU is there, else cpu."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda":
        require_cuda()
    return device


def drift(
    reference: Spill, candidate: Iterator[torch.Tensor], parts: list[Batch], next_tokens: bool = True
) -> Drift:
    """Drift of the candidate's logits against the reference's, over the scored positions of each chunk
    (without `next_tokens`, class logits: no token is predicted, no perplexity)."""
    d = Drift()
    for i, (part, cand) in enumerate(zip(parts, candidate, strict=True)):
        ref, mask = reference.get(i), part.scored
        d.add(ref[mask], cand[mask], part.targets[mask] if next_tokens else None)
    return d


# what a sequence classifier's check does not do, by option: it compares class logits on text
_CLASSIFIER_OPTIONS = {
    "data": "--data (its records' responses are tokens to predict; a classifier predicts a class)",
    "generate": "--generate (a classifier writes no completions)",
    "against_base": "--against-base (the base has no classification head)",
    "naive": "--naive",
    "probe_quant": "--probe-quant (it fits the adapter to the data's responses)",
}


def _classifier_check(source: Source, opts: Options, kind: str) -> None:
    """A sequence classifier (a SEQ_CLS adapter) is checked on its class logits at every position of the
    text: refuse what does not apply."""
    asked = [words for key, words in _CLASSIFIER_OPTIONS.items() if getattr(opts, key, None)]
    if kind == "gguf":
        asked.insert(0, "a GGUF candidate (qmerge does not write classifiers as GGUF; llama.cpp runs them)")
    if asked:
        raise UnsupportedError(
            f"{source.adapter.path} is a sequence-classification adapter (task_type SEQ_CLS): check compares "
            f"the classifier's class logits on text, so it does not take {'; '.join(asked)}."
        )


def check(
    adapter: Path,
    candidate: Path,
    base: Path | None = None,
    thresholds: Thresholds = Thresholds(),
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    progress: Progress | None = None,
    options: Options = Options(),
    **option_values,
) -> CheckReport:
    """Compare a candidate with the unmerged QLoRA model and apply the thresholds (options: see Options;
    they may also be given as keywords)."""
    opts = options.with_values(option_values, thresholds, merge_base)
    source = open_checkpoint(
        Path(adapter), Path(base) if base else None, quant, merge_base, allow_other_base=opts.allow_other_base
    )
    kind, device = candidate_kind(Path(candidate)), resolve_device(opts.device)
    _refuse_early(source, opts, kind, Path(candidate))
    session = Session(source, opts, device, progress)
    cand = session.candidate(Path(candidate), kind)
    metrics, stats = session.measure(cand)
    against = session.against_base(cand) if opts.against_base else None
    task = session.task(cand) if opts.generate else None
    naive = session.naive(quant) if opts.naive else None
    probe = session.probe() if opts.probe_quant else None
    session.close()
    failures = gate(metrics, thresholds, task["agreement"] if task else None)
    if probe is not None and probe["verdict"] == "differs":
        (failures if opts.probe_quant == "fail" else source.warnings).append(probe["message"])
    extra = {"llama_cpp": stats, "against_base": against, "task": task, "quantization_probe": probe}
    extra |= _inputs_said(session)
    return CheckReport(
        not failures,
        metrics,
        thresholds,
        str(candidate),
        kind,
        failures,
        naive,
        delta_retention(Path(candidate)),
        {k: v for k, v in extra.items() if v is not None},
    )


def _refuse_early(source: Source, opts: Options, kind: str, candidate: Path) -> None:
    """What the candidate's kind or the adapter's task rules out, before any model runs."""
    if source.task_config is not None:
        _classifier_check(source, opts, kind)
    if kind == "gguf" and opts.data is not None and any(has_images(r) for r in read_jsonl(opts.data)):
        raise gguf_refusal(candidate, opts.data)


def _inputs_said(session: Session) -> dict:
    """What the report says of its inputs: the data scored, warnings, the quantization and its source."""
    source, opts = session.source, session.opts
    return {
        "data": str(opts.data) if session.data_scored else None,
        "warnings": source.warnings or None,
        "quantization": source.quantization.to_json() if source.quantization else None,
    }


class Session:
    """The reference's results on the check's batches (computed once, the model then dropped), against
    which one or more candidates are measured."""

    def __init__(self, source: Source, opts: Options, device: str, progress: Progress | None):
        self.source, self.opts, self.device, self.progress = source, opts, device, progress
        # the processor that prepares --data's images (the adapter's, else the base's): loaded once, if asked
        self._processor = cache(lambda: load_processor(source.adapter.path, source.base.path))
        self.tokenizer = load_tokenizer(source.adapter.path, source.base.path)
        fp32 = opts.fp32_reference
        model = cuda_reference(source, fp32) if device == "cuda" else streamed_reference(source)
        self.vocab = model.get_input_embeddings().weight.shape[0]
        # token ids both ends know: Mllama's embedding has 8 rows more than its output layer
        out = model.get_output_embeddings()
        logits = out.weight.shape[0] if getattr(out, "weight", None) is not None else self.vocab
        reference = Runner("reference", model, progress=progress)
        text = text_batch(self.tokenizer, min(self.vocab, logits), opts.text, opts.seq_len, opts.max_seqs)
        self.data_scored = opts.data is not None  # False: --data held prompts only (see _data_batch)
        main = self._data_batch(text) if opts.data else text
        self.main, self.text = chunks(main, logits), chunks(text, logits)
        self.asked = (
            prompts(self.tokenizer, opts.data, opts.generate, self._processor)
            if opts.generate and opts.data
            else []
        )
        self.ref = reference.spill(self.main)
        self.ref_answers = (
            reference.complete(self.tokenizer, self.asked, opts.max_new_tokens) if self.asked else []
        )
        self.base = self._base().spill(self.text) if opts.against_base else None

    def _data_batch(self, text: Batch) -> Batch:
        """--data's response tokens; held-out prompts without answers (chats that end in a user turn) serve
        --generate only, and the drift is then measured on text, as said in the warnings."""
        opts = self.opts
        try:
            return data_batch(
                self.tokenizer, opts.data, max(opts.seq_len, 512), opts.max_seqs, processor=self._processor
            )
        except NoResponse:
            if not opts.generate or opts.probe_quant:
                raise
        self.source.warnings.append(
            f"{opts.data} holds prompts without answers: the drift is measured on "
            f"{'--text' if opts.text else 'the built-in text'}, the prompts are completed for --generate."
        )
        self.data_scored = False
        return text

    def _base(self) -> Runner:
        """The base model without the adapter: the weights training saw."""
        s = self.source
        if self.device == "cuda":
            return Runner("base", cuda_base(s, self.opts.fp32_reference), progress=self.progress)
        return Runner(
            "base", streamed_model(Source(s.base, None, s.quant, s.merge_base)), progress=self.progress
        )

    def candidate(self, path: Path, kind: str, lora: Path | None = None) -> Runner:
        """The candidate in its engine (a GGUF with `lora`, else the check's --lora, applied)."""
        lora = lora or self.opts.lora
        if kind == "gguf":
            if self.main[0].inputs or any(a.inputs for a in self.asked):
                raise gguf_refusal(path, self.opts.data)
            self._same_vocabulary(path, llama_cpp.gguf_vocab_size(path))
            return Runner("candidate", gguf=path, progress=self.progress, lora=lora)
        if lora is not None:
            from ..errors import InputError

            raise InputError(
                f"--lora applies a llama.cpp adapter to a GGUF --candidate; {path} is a {kind} model."
            )
        fp32 = self.opts.fp32_reference
        model = (
            cuda_candidate(path, kind, fp32) if self.device == "cuda" else streamed_model(open_source(path))
        )
        self._same_vocabulary(path, model.get_input_embeddings().weight.shape[0])
        return Runner("candidate", model, progress=self.progress)

    def _same_vocabulary(self, path: Path, vocab: int | None) -> None:
        """Refuse a candidate whose vocabulary is not the unmerged model's: its token ids mean other tokens
        (and ids past its end would fail inside the model rather than say so)."""
        if vocab is not None and vocab != self.vocab:
            from ..errors import MismatchError

            raise MismatchError(
                f"{path}: the candidate has another vocabulary ({vocab} tokens; the unmerged model has "
                f"{self.vocab}): it is not a model of this fine-tune (another base, or tokens added or removed). "
                "Pass the candidate made from this adapter."
            )

    def measure(self, cand: Runner) -> tuple:
        d = drift(self.ref, cand.logits(self.main), self.main, self.source.task_config is None)
        return d.metrics(), d.llama_cpp()

    def against_base(self, cand: Runner) -> dict:
        d = drift(self.base, cand.logits(self.text), self.text)
        return {"metrics": d.metrics().__dict__, "llama_cpp": d.llama_cpp()}

    def task(self, cand: Runner) -> dict:
        if not self.asked:
            from ..errors import InputError

            raise InputError("--generate needs --data: the prompts come from the data's records.")
        answers = cand.complete(self.tokenizer, self.asked, self.opts.max_new_tokens)
        done = [
            Completion(p, a, r, c)
            for (_, p, a, _), r, c in zip(self.asked, self.ref_answers, answers, strict=True)
        ]
        return task_summary(done)

    def naive(self, quant: QuantSettings | None):
        """PEFT's merge_and_unload on the 4-bit model (whole model in memory: an opt-in comparison)."""
        model = naive_merged_model(
            self.source.adapter,
            self.source.base,
            quant_settings_for(self.source.adapter, quant, self.source.base),
        )
        d = Drift()
        for i, part in enumerate(self.main):
            d.add(
                self.ref.get(i)[part.scored],
                model_logits(model, part.tokens, part.extra)[part.scored],
                part.targets[part.scored],
            )
        return d.metrics()

    def probe(self) -> dict:
        """Which 4-bit settings the adapter fits the data best under (probe.py); a 4-bit checkpoint base
        holds the quant states training read, so there is nothing to probe."""
        if self.source.base.is_4bit:
            return {
                "verdict": "known",
                "message": "quantization probe: the base is a 4-bit checkpoint; training read its quant states.",
            }
        from .probe import probe_quantization

        result = probe_quantization(self.source, self.main, self.progress)
        return {**result.to_json(), "message": result.message}

    def close(self) -> None:
        for spill in (self.ref, self.base):
            if spill is not None:
                spill.close()


AGREEING_SHOWN = 20  # completions that agree, kept in the JSON and the report


def task_summary(done: list[Completion]) -> dict:
    """Agreement of the candidate's completions with the reference's, and each one's accuracy on answers."""
    with_answer = [c for c in done if c.expected is not None]

    def accuracy(pick) -> float | None:
        return (
            sum(pick(c) == c.expected.strip() for c in with_answer) / len(with_answer)
            if with_answer
            else None
        )

    return {
        "prompts": len(done),
        "agreement": sum(c.agrees for c in done) / len(done),
        "accuracy_reference": accuracy(lambda c: c.reference),
        "accuracy_candidate": accuracy(lambda c: c.candidate),
        "differing": [c.__dict__ for c in done if not c.agrees],
        # some that agree too, so that an accuracy (even 0%) can be read against what the models answered
        "agreeing": [c.__dict__ for c in done if c.agrees][:AGREEING_SHOWN],
    }
