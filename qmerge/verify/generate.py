"""Greedy completions of prompts, by a transformers model (streamed, or whole on CUDA) and by llama.cpp (with
the GGUF's own tokenizer and chat template), compared as text: does the candidate say what the unmerged
model says, and what the data says it should?"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pipeline.model import quiet_libraries


@dataclass(frozen=True)
class Completion:
    prompt: str
    expected: str | None
    reference: str
    candidate: str

    @property
    def agrees(self) -> bool:
        return self.candidate == self.reference


def normal(text: str) -> str:
    """Completions compare after trimming whitespace (what a reader would call the same answer)."""
    return text.strip()


def hf_complete(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` by a transformers (or PEFT) model, all prompts in one left-padded
    batch; special tokens (end-of-turn markers) dropped from the text."""
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [i for i in {tokenizer.eos_token_id, *_end_of_turn(tokenizer)} if i is not None]
    with torch.no_grad(), quiet_libraries():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    return [normal(tokenizer.decode(row, skip_special_tokens=True)) for row in new]


def _end_of_turn(tokenizer) -> list[int]:
    """Special tokens that end an assistant turn in common chat templates, where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    return [
        vocab[t]
        for t in ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>")
        if t in vocab
    ]
