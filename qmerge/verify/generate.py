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


def hf_complete(
    model, tokenizer, prompts: list[str], max_new_tokens: int, inputs: list[dict | None] | None = None
) -> list[str]:
    """Greedy completions of `prompts` by a transformers (or PEFT) model, all prompts in one left-padded
    batch; special tokens (end-of-turn markers) dropped from the text. Prompts with images (`inputs`: the
    processor's tensors of each) are completed one at a time, with their pixel values."""
    if inputs is not None and any(x is not None for x in inputs):
        return [_greedy(model, tokenizer, x, max_new_tokens)[0] for x in inputs]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return _greedy(model, tokenizer, dict(enc), max_new_tokens)


def _greedy(model, tokenizer, enc: dict, max_new_tokens: int) -> list[str]:
    """model.generate, greedy, on the prepared inputs (ids, mask, pixel values) on the model's device."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [i for i in {tokenizer.eos_token_id, *_end_of_turn(tokenizer)} if i is not None]
    with torch.no_grad(), quiet_libraries():
        out = model.generate(
            **on_device(enc, model),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos or None,
        )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    return [normal(tokenizer.decode(row, skip_special_tokens=True)) for row in new]


def on_device(inputs: dict, model) -> dict:
    """A processor's or tokenizer's tensors on the device the model runs on (the CPU for a streamed model,
    whose parameters wait on the meta device); on a GPU, pixel values in the model's dtype."""
    params = [p for p in model.parameters() if p.device.type != "meta"]
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), None) if device.type == "cuda" else None
    return {
        k: v.to(device, dtype=dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


def _end_of_turn(tokenizer) -> list[int]:
    """Special tokens that end an assistant turn in common chat templates, where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    return [
        vocab[t]
        for t in ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>")
        if t in vocab
    ]
