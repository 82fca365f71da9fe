"""How check runs one model over its batches: a transformers model (streamed, or on CUDA) or a GGUF file in
llama.cpp, a chunk of sequences at a time (LOGITS_BUDGET), with progress; and where the reference's logits
wait for the candidate's (Spill: in memory for one chunk, on disk beyond)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import llama_cpp
from .cuda import cuda_logits
from .generate import hf_complete
from .streamed import logits, report_layers
from .tokens import Asked, Batch

LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits per chunk of sequences
Progress = Callable[[str, int, int], None]


def chunks(batch: Batch, vocab: int) -> list[Batch]:
    """The sequences in chunks whose logits [k, seq, vocab] fit LOGITS_BUDGET (at least one sequence);
    sequences with images one at a time (their image inputs are per sequence)."""
    per = 1 if batch.inputs else max(1, LOGITS_BUDGET // (batch.tokens.shape[1] * vocab * 4))
    return [batch.part(i, i + per) for i in range(0, len(batch), per)]


class Spill:
    """Logits of each chunk, kept in memory for one chunk or on disk for several."""

    def __init__(self, n_chunks: int):
        self._dir = tempfile.TemporaryDirectory(prefix="qmerge-check-") if n_chunks > 1 else None
        self._held: dict[int, torch.Tensor] = {}

    def put(self, i: int, t: torch.Tensor) -> None:
        if self._dir is None:
            self._held[i] = t
        else:
            t.numpy().tofile(Path(self._dir.name) / f"{i}.f32")
            self._held[i] = torch.empty(t.shape, device="meta")

    def get(self, i: int) -> torch.Tensor:
        if self._dir is None:
            return self._held[i]
        shape = self._held[i].shape
        return torch.from_numpy(np.fromfile(Path(self._dir.name) / f"{i}.f32", dtype=np.float32)).view(shape)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


class Runner:
    """One model in its engine: a transformers model (streamed or on CUDA), or a GGUF file in llama.cpp."""

    def __init__(
        self, phase: str, model=None, gguf: Path | None = None, progress: Progress | None = None, lora=None
    ):
        self.phase, self.model, self.gguf, self.progress, self.lora = phase, model, gguf, progress, lora

    def logits(self, parts: list[Batch]) -> Iterator[torch.Tensor]:
        """Logits of each chunk, with (phase, layer) progress and tokens per second on the way."""
        if self.gguf is not None:
            for part in parts:
                assert not part.inputs, "a GGUF candidate is refused image data (Session.candidate)"
                yield llama_cpp.gguf_logits(self.gguf, part.tokens, part.lengths, self.lora)
            return
        hooks = report_layers(self.model, self.phase, self.progress)
        run = cuda_logits if any(p.device.type == "cuda" for p in self.model.parameters()) else logits
        done, start, total = 0, time.perf_counter(), sum(sum(p.lengths) for p in parts)
        try:
            for part in parts:
                yield run(self.model, part.tokens, part.extra)
                done += sum(part.lengths)
                if self.progress:
                    rate = done / (time.perf_counter() - start)
                    self.progress(f"{self.phase}: {done} tokens, {rate:.0f} tokens/s", done, total)
        finally:
            for h in hooks:
                h.remove()

    def spill(self, parts: list[Batch]) -> Spill:
        spill = Spill(len(parts))
        try:
            for i, t in enumerate(self.logits(parts)):
                spill.put(i, t)
        except BaseException:
            spill.close()
            raise
        return spill

    def complete(self, tokenizer, asked: list[Asked], max_new_tokens: int) -> list[str]:
        prompts_ = [a.prompt for a in asked]
        if self.gguf is not None:
            assert not any(a.inputs for a in asked), "a GGUF candidate is refused images (Session.candidate)"
            records = [a.record for a in asked]
            return llama_cpp.gguf_complete(self.gguf, records, prompts_, max_new_tokens, self.lora)
        if self.progress:
            self.progress(f"{self.phase}: completing {len(asked)} prompts", 0, len(asked))
        return hf_complete(self.model, tokenizer, prompts_, max_new_tokens, [a.inputs for a in asked])
