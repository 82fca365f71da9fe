"""Image+text records for `check --data`: chat records whose messages hold image parts, as TRL and the
vision-language chat templates write them. Each image part names its image (`path`, `url` or `image`: a
file, relative to the JSONL file's folder, an http(s) URL or base64 data), or takes the next one of TRL's
`images` column. The model's processor renders a record as training fed it: its chat template, its image
processor, its image tokens; the positions that predict an assistant token are scored, as for text records.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import IGNORE, NoResponse, image_parts, messages_of
from ..errors import InputError, UnsupportedError

SOURCE_KEYS = ("path", "url", "image")


def load_processor(*dirs: Path | None):
    """The processor (tokenizer, chat template, image processor) saved in the first of dirs that has one."""
    from transformers import AutoProcessor

    from ..pipeline.model import quiet_libraries

    for d in dirs:
        if d is None or not any(
            (Path(d) / f).exists() for f in ("processor_config.json", "preprocessor_config.json")
        ):
            continue
        try:
            with quiet_libraries():
                return AutoProcessor.from_pretrained(str(d))
        except Exception as e:  # a missing package shows as ImportError, or (Qwen-VL's video processor
            # without torchvision) as an AttributeError inside transformers
            raise InputError(
                f"{d}: transformers cannot build this model's processor ({type(e).__name__}: {e}). It may need "
                "more packages (pip install torchvision for Qwen-VL's processors); install them, then run "
                "check again."
            ) from e
    raise InputError(
        "--data holds images, but neither the adapter nor the base folder has the processor that prepares them "
        "(processor_config.json or preprocessor_config.json): save the processor training used "
        "(processor.save_pretrained) beside the adapter, or check on text records."
    )


def _load_image(source, folder: Path, where: str):
    from transformers.image_utils import load_image

    if not isinstance(source, str) or not source:
        raise InputError(f"{where}: an image part must name its image (path, url or image) as a string.")
    if not source.startswith(("http://", "https://", "data:")) and len(source) < 4096:
        path = Path(source) if Path(source).is_absolute() else folder / source
        if not path.is_file():
            raise InputError(
                f"{where}: the image {path} does not exist (paths are relative to the data file)."
            )
        source = str(path)
    try:
        return load_image(source)
    except Exception as e:  # Pillow's and requests' errors: an unreadable image, a URL that does not answer
        raise InputError(f"{where}: cannot read the image {source[:200]} ({type(e).__name__}: {e}).") from e


def _with_images(row: dict, folder: Path, where: str) -> tuple[list, list]:
    """(messages with bare `{"type": "image"}` parts, as chat templates render them; the images in order)."""
    if not messages_of(row):
        raise InputError(
            f"{where}: in a file with images every record must be a chat: {{'messages': [...]}} (or TRL's "
            "conversational prompt/completion)."
        )
    column = list(row.get("images") or [])
    messages, images = [], []
    for m in messages_of(row):
        if not image_parts(m):
            messages.append(m)
            continue
        parts = []
        for p in m["content"]:
            if isinstance(p, dict) and p.get("type") == "image":
                named = next((p[k] for k in SOURCE_KEYS if p.get(k) is not None), None)
                if named is None and not column:
                    raise InputError(
                        f"{where}: an image part names no image and the 'images' column has none left."
                    )
                images.append(_load_image(named if named is not None else column.pop(0), folder, where))
                p = {"type": "image"}
            parts.append(p)
        messages.append({**m, "content": parts})
    if column:
        raise InputError(
            f"{where}: the 'images' column has {len(column)} more image(s) than the messages have image parts."
        )
    return messages, images


def encode_image_record(row: dict, processor, folder: Path, where: str) -> dict:
    """input_ids, labels (the assistant messages' tokens, the template's end of turn included) and the
    model's other inputs (pixel values, image sizes, ...) of one record, by the model's processor. Records
    are not truncated: cutting an image's tokens would leave the image inputs without their place."""
    messages, images = _with_images(row, folder, where)
    answers = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not answers:
        raise NoResponse(f"{where}: a chat record needs at least one assistant message to score.")

    def encode(msgs: list, generation: bool = False) -> dict:
        return _prepared(processor, msgs, images, generation, where)[1]

    full = encode(messages)
    ids = full["input_ids"][0].tolist()
    labels = [IGNORE] * len(ids)
    for k, i in enumerate(answers):
        start = _common_length(ids, encode(messages[:i], generation=True)["input_ids"][0].tolist())
        end = (
            len(ids)
            if k == len(answers) - 1
            else _common_length(ids, encode(messages[: i + 1])["input_ids"][0].tolist())
        )
        labels[start:end] = ids[start:end]
    inputs = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    return {"input_ids": ids, "labels": labels, "inputs": inputs}


def _prepared(processor, msgs: list, images: list, generation: bool, where: str) -> tuple[str, dict]:
    """(the chat template's text, the processor's tensors) of `msgs`, with the images they show."""
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
    shown = images[: sum(len(image_parts(m)) for m in msgs)]
    try:
        return text, processor(
            text=[text], images=shown or None, add_special_tokens=False, return_tensors="pt"
        )
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{where}: the model's processor cannot prepare this record ({e}).") from e


def image_prompt(row: dict, processor, folder: Path, where: str) -> tuple[str, str | None, dict]:
    """(prompt text, the record's answer or None, the processor's tensors of the prompt) for --generate: the
    chat up to its last message when that is the assistant's (the answer), else whole; with the generation
    prompt, as data.prompt_and_answer renders text records."""
    messages, images = _with_images(row, folder, where)
    answered = isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    text, inputs = _prepared(processor, messages[:-1] if answered else messages, images, True, where)
    return text, _text_of(messages[-1].get("content")) if answered else None, dict(inputs)


def _text_of(content) -> str:
    """A message's text: a string content, or its text parts joined."""
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return str(content)


def _common_length(a: list[int], b: list[int]) -> int:
    """Where a rendered prefix's tokens stop matching the record's."""
    return len(os.path.commonprefix([a, b]))


def encode_image_records(rows: list[dict], processor, path: Path) -> list[dict]:
    """Every record through the processor (text-only ones too, so that all are rendered alike); records
    without an assistant message are skipped (prompts for --generate)."""
    out = []
    for i, row in enumerate(rows, 1):
        try:
            out.append(encode_image_record(row, processor, path.parent, f"{path}:{i}"))
        except NoResponse:
            continue
    return out


def gguf_refusal(gguf: Path, data: Path) -> UnsupportedError:
    """Why a GGUF candidate is not checked on records with images, and what to check instead."""
    return UnsupportedError(
        f"{gguf}: a GGUF candidate runs in llama.cpp on token ids, and qmerge does not feed it images: check "
        f"the merged folder on {data} (the records with images), and the GGUF on text (--data with text "
        "records, or --text)."
    )
