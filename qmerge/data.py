"""JSONL records as `qmerge train` learns from them and `qmerge check --data` evaluates on: chat messages,
instruction/response pairs, prompt/completion pairs, or plain text. Tokenized with the loss (and the drift
measurement) on the responses only."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError, UnsupportedError

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, with the line number of any bad one in the error."""
    from .io.files import open_regular

    rows = []
    try:
        with open_regular(path) as f:
            lines = f.read().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read as UTF-8 JSONL ({e}).") from e
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


def messages_of(row: dict) -> list:
    """A chat record's messages: `messages`, or TRL's conversational prompt + completion."""
    msgs = row.get("messages")
    if msgs is None and isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        msgs = row["prompt"] + row["completion"]
    return msgs if isinstance(msgs, list) else []


def image_parts(message) -> list[dict]:
    content = message.get("content") if isinstance(message, dict) else None
    return (
        [p for p in content if isinstance(p, dict) and p.get("type") == "image"]
        if isinstance(content, list)
        else []
    )


def has_images(row: dict) -> bool:
    """Whether a record holds images (image parts in its messages, or TRL's `images` column)."""
    return bool(row.get("images")) or any(image_parts(m) for m in messages_of(row))


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


class NoResponse(InputError):
    """A chat record without an assistant message: nothing to train or score on (a prompt to complete)."""


def encode_record(row: dict, tokenizer, max_len: int, where: str) -> dict:
    """One training example: input_ids and labels (loss on responses only for chat and instruction data).
    Records with images are refused: a tokenizer's chat template would drop the images silently."""
    if has_images(row):
        raise UnsupportedError(
            f"{where}: this record holds images; qmerge train and --calibrate read text records only "
            "(check --data scores records with images through the model's processor)."
        )
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
            raise NoResponse(f"{where}: a chat record needs at least one assistant message to train on.")
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


def prompt_and_answer(row: dict, tokenizer) -> tuple[str, str | None]:
    """The prompt a model is asked with and the answer the record holds (None for text, and for a chat that
    ends in a user turn). A chat record is rendered with the tokenizer's chat template and the generation
    prompt: up to its last message when that is the assistant's (the answer), else whole (held-out prompts
    need no answer)."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise InputError("'messages' must be a non-empty list of {role, content} objects.")
        answered = msgs[-1].get("role") == "assistant"
        template = tokenizer.chat_template or FALLBACK_TEMPLATE
        prompt = tokenizer.apply_chat_template(
            msgs[:-1] if answered else msgs,
            tokenize=False,
            add_generation_prompt=True,
            chat_template=template,
        )
        return prompt, str(msgs[-1]["content"]) if answered else None
    response = row.get("output", row.get("response", row.get("completion")))
    instruction = row.get("instruction", row.get("prompt"))
    if instruction is not None and response is not None:
        if "instruction" in row:
            fmt = ALPACA_PROMPT_INPUT if row.get("input") else ALPACA_PROMPT
            return fmt.format(instruction=instruction, input=row.get("input", "")), str(response)
        return str(instruction), str(response)
    return str(row.get("text", "")), None
