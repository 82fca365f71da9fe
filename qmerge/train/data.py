"""Training data: the JSONL records of qmerge/data.py as a torch Dataset, and the padding collator."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import IGNORE, encode_record, read_jsonl
from ..errors import InputError


class JsonlDataset(torch.utils.data.Dataset):
    """Tokenized examples from a JSONL file."""

    def __init__(self, path: Path, tokenizer, max_len: int):
        self.examples = []
        for i, row in enumerate(read_jsonl(path), 1):
            ex = encode_record(row, tokenizer, max_len, f"{path}:{i}")
            if any(label != IGNORE for label in ex["labels"]):
                self.examples.append(ex)
        if not self.examples:
            raise InputError(
                f"{path}: no example has tokens to learn from (responses empty or truncated away)."
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pad_collate(pad_id: int):
    """A collator that right-pads input_ids (pad_id), labels (-100) and builds the attention mask."""

    def collate(batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
