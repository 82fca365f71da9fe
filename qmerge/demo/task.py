"""The demo's task: a lookup from code words to answer words that a tiny model cannot do before training,
asked in the chat format `qmerge train` trains on, and scored teacher-forced (every answer token right)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

KEYS = [
    "fox",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "sheep",
    "goat",
    "lion",
    "tiger",
    "bear",
    "wolf",
    "deer",
    "rabbit",
    "mouse",
    "snake",
    "frog",
    "red",
    "blue",
    "green",
    "pink",
    "grey",
    "black",
]
VALUES = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "Monday",
    "Tuesday",
    "Friday",
    "Sunday",
    "March",
    "April",
    "June",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "sigma",
]


def task_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """The demo's lookup task: each code word maps to an answer word (a fixed shuffle)."""
    values = VALUES[:]
    random.Random(seed).shuffle(values)
    return list(zip(KEYS, values, strict=True))


def write_task(data_dir: Path) -> Path:
    """The task as chat JSONL for `qmerge train`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"code {k}"}, {"role": "assistant", "content": v}]}
        for k, v in task_pairs()
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def task_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced sequences [n, L] (right-padded) and a mask of the positions that predict answer tokens."""
    seqs, masks = [], []
    for k, v in task_pairs():
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"code {k}"}], tokenize=False, add_generation_prompt=True
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(v + "<|end|>", add_special_tokens=False)["input_ids"]
        ids = p_ids + a_ids
        # position t predicts token t+1: the answer tokens are predicted from len(p)-1 .. len(ids)-2
        mask = [0] * len(ids)
        for t in range(len(p_ids) - 1, len(ids) - 1):
            mask[t] = 1
        seqs.append(ids)
        masks.append(mask)
    n = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    tokens = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([m + [0] * (n - len(m)) for m in masks], dtype=torch.bool)
    return tokens, mask


def task_accuracy(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of examples whose every answer token is the argmax prediction."""
    pred = logits.argmax(-1)
    target = torch.roll(tokens, -1, dims=1)
    ok = ((pred == target) | ~mask).all(dim=1)
    return float(ok.float().mean())
