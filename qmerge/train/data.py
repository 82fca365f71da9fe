"""Training data: JSONL with chat messages, instruction/response pairs, or plain text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, with the line number of any bad one in the error."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e}).") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON ({e.msg}).") from e
        if not isinstance(row, dict):
            raise InputError(f"{path}:{i}: each line must be a JSON object.")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no records.")
    return rows


def _spans_tokenize(tokenizer, text: str, spans: list[tuple[int, int]], max_len: int) -> dict:
    """Tokenize text; labels are the token ids inside the character spans, -100 elsewhere."""
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len
    )
    labels = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = any(s >= a and e <= b and e > s for a, b in spans)
        labels.append(tid if inside else IGNORE)
    return {"input_ids": enc["input_ids"], "labels": labels}


def encode_record(row: dict, tokenizer, max_len: int, where: str) -> dict:
    """One training example: input_ids and labels (loss on responses only for chat and instruction data)."""
    eos = tokenizer.eos_token or ""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs
        ):
            raise InputError(f"{where}: 'messages' must be a list of {{role, content}} objects.")
        template = tokenizer.chat_template or FALLBACK_TEMPLATE
        render = lambda ms, gen=False: tokenizer.apply_chat_template(  # noqa: E731
            ms, tokenize=False, add_generation_prompt=gen, chat_template=template
        )
        text = render(msgs)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(render(msgs[:i], gen=True))
                spans.append((start, len(render(msgs[: i + 1]))))
        if not spans:
            raise InputError(f"{where}: a chat record needs at least one assistant message to learn from.")
        return _spans_tokenize(
            tokenizer, text + eos, [*spans[:-1], (spans[-1][0], len(text) + len(eos))], max_len
        )
    response = row.get("output", row.get("response", row.get("completion")))
    instruction = row.get("instruction", row.get("prompt"))
    if instruction is not None and response is not None:
        prompt = (
            (ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT).format(
                instruction=instruction, input=row.get("input", "")
            )
            if "instruction" in row
            else str(instruction)
        )
        text = prompt + str(response) + eos
        return _spans_tokenize(tokenizer, text, [(len(prompt), len(text))], max_len)
    if "text" in row:
        enc = tokenizer(str(row["text"]) + eos, add_special_tokens=False, truncation=True, max_length=max_len)
        return {"input_ids": enc["input_ids"], "labels": list(enc["input_ids"])}
    raise InputError(
        f"{where}: unknown record; use {{'messages': [...]}}, {{'instruction', 'output'}}, "
        "{'prompt', 'completion'} or {'text'}."
    )


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
