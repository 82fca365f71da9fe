"""The token sequences a check runs on: the user's text (or a built-in paragraph), every position scored;
or the user's JSONL data (the formats `qmerge train` reads), only the positions that predict a response
token scored, since that is where a fine-tune lives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..data import IGNORE, NoResponse, encode_record, has_images, prompt_and_answer, read_jsonl
from ..errors import InputError, UnsupportedError
from .images import encode_image_records, image_prompt

DEFAULT_TEXT = (
    "QLoRA fine-tunes a large language model cheaply: the base weights are frozen in 4-bit NormalFloat, and "
    "small LoRA matrices are trained on every linear layer. After training, the adapter is merged into the "
    "base and the model is exported for deployment. The quick brown fox jumps over the lazy dog. "
    "Question: what is the capital of France? Answer: Paris. One, two, three, four, five, six, seven. "
    "User: hello there. Assistant: hello, how can I help you today? Red orange yellow green blue indigo."
)


@dataclass(frozen=True)
class Batch:
    """Sequences right-padded to one length, and which positions are scored.

    targets[i, t] is the token position t is scored on predicting (-1: none, e.g. the last position of a
    text sequence, which still counts for KL and top-1); scored[i, t] says whether position t counts at all.
    """

    tokens: torch.Tensor  # [n, L]
    lengths: list[int]
    targets: torch.Tensor  # [n, L]
    scored: torch.Tensor  # [n, L] bool
    inputs: tuple[dict, ...] | None = None  # each sequence's other model inputs (images), if any

    def __len__(self) -> int:
        return len(self.lengths)

    def part(self, i: int, j: int) -> Batch:
        if self.inputs is None:
            return Batch(self.tokens[i:j], self.lengths[i:j], self.targets[i:j], self.scored[i:j])
        # sequences with images run one at a time, unpadded: their inputs are per sequence
        assert j == i + 1, "sequences with images are run one at a time"
        k = self.lengths[i]
        return Batch(
            self.tokens[i:j, :k],
            self.lengths[i:j],
            self.targets[i:j, :k],
            self.scored[i:j, :k],
            self.inputs[i:j],
        )

    @property
    def extra(self) -> dict:
        """The model inputs besides the token ids: a one-sequence part's images (pixel values, sizes)."""
        return self.inputs[0] if self.inputs else {}


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


def text_batch(tokenizer, vocab_size: int, text: str | None, seq_len: int = 128, max_seqs: int = 8) -> Batch:
    """Every position of the text's sequences scored (the contract's text check)."""
    tokens = make_tokens(tokenizer, vocab_size, text, seq_len, max_seqs)
    targets = torch.full_like(tokens, -1)
    targets[:, :-1] = tokens[:, 1:]
    return Batch(tokens, [tokens.shape[1]] * len(tokens), targets, torch.ones_like(tokens, dtype=torch.bool))


def data_batch(
    tokenizer, path: Path, seq_len: int = 512, max_records: int = 8, processor: Callable | None = None
) -> Batch:
    """The first max_records records of a JSONL file, tokenized as `qmerge train` does; the positions that
    predict a response token (a trained label) are scored. Records with images are prepared by the model's
    processor (`processor()` loads it; images.py), each with its image inputs."""
    if tokenizer is None:
        raise InputError("--data needs the model's tokenizer (tokenizer.json in the adapter or the base).")
    rows = read_jsonl(path)[:max_records]
    if any(has_images(row) for row in rows):
        if processor is None:
            raise InputError(f"{path}: records with images are scored by a transformers model, not here.")
        encoded = encode_image_records(rows, processor(), path)
    else:
        encoded = []
        for i, row in enumerate(rows, 1):
            try:
                encoded.append(encode_record(row, tokenizer, seq_len, f"{path}:{i}"))
            except NoResponse:
                continue  # a prompt without its answer: for --generate, nothing to score here
    encoded = [e for e in encoded if any(label != IGNORE for label in e["labels"][1:])]
    if not encoded:
        raise NoResponse(
            f"{path}: no record has response tokens to compare the models on (prompts only, empty, or "
            "truncated away)."
        )
    n, width = len(encoded), max(len(e["input_ids"]) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((n, width), pad, dtype=torch.long)
    targets = torch.full((n, width), -1, dtype=torch.long)
    for i, e in enumerate(encoded):
        k = len(e["input_ids"])
        tokens[i, :k] = torch.tensor(e["input_ids"])
        labels = torch.tensor(e["labels"][1:] + [IGNORE])
        targets[i, :k] = torch.where(labels == IGNORE, -1, labels)
    inputs = tuple(e["inputs"] for e in encoded) if "inputs" in encoded[0] else None
    return Batch(tokens, [len(e["input_ids"]) for e in encoded], targets, targets >= 0, inputs)


class Asked(NamedTuple):
    """A prompt --generate completes: its record, text, the record's answer (None for a held-out prompt),
    and for a record with images the processor's tensors (ids, mask, pixel values) the models are run on."""

    record: dict
    prompt: str
    answer: str | None
    inputs: dict | None = None


def prompts(tokenizer, path: Path, n: int, processor: Callable | None = None) -> list[Asked]:
    """The first n records that have a prompt; when one of them holds images, all are prepared by the
    model's processor (`processor()` loads it; images.py)."""
    rows = read_jsonl(path)
    visual = any(has_images(row) for row in rows)
    if visual and processor is None:
        raise UnsupportedError(
            f"{path}: records with images are completed by a transformers model, not here."
        )
    proc = processor() if visual else None
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{path}:{i}"
        if proc is not None:
            out.append(Asked(row, *image_prompt(row, proc, path.parent, where)))
        else:
            try:
                prompt, answer = prompt_and_answer(row, tokenizer)
            except InputError as e:
                raise InputError(f"{where}: {e}") from e
            if prompt:
                out.append(Asked(row, prompt, answer))
        if len(out) == n:
            break
    if not out:
        raise InputError(
            f"{path}: no record has a prompt to complete (--generate needs chat or instruction data)."
        )
    return out
