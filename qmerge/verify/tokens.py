"""The token sequences a check runs on: the user's text, or a built-in paragraph."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from .reference import quiet_libraries

DEFAULT_TEXT = (
    "QLoRA fine-tunes a large language model cheaply: the base weights are frozen in 4-bit NormalFloat, and "
    "small LoRA matrices are trained on every linear layer. After training, the adapter is merged into the "
    "base and the model is exported for deployment. The quick brown fox jumps over the lazy dog. "
    "Question: what is the capital of France? Answer: Paris. One, two, three, four, five, six, seven. "
    "User: hello there. Assistant: hello, how can I help you today? Red orange yellow green blue indigo."
)


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
