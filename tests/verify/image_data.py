"""Tiny LLaVA and Gemma 3 bases with the processor a released one ships (image processor, image tokens,
chat template that renders image parts), a QLoRA-style adapter on its language model and vision tower, and
image+text JSONL records in the formats check reads (an image part with its path; TRL's `images` column)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# a chat template in the shape of released VLM templates: string contents, or lists of typed parts
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CLIP_NORM = dict(
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]
)


# the image marker each family's chat template writes for an image part (its processor expands it)
MARKER = {"llava": "<image>", "gemma3": "<start_of_image>"}


def tiny_vlm_with_processor(root: Path, family: str) -> tuple[Path, Path]:
    """(base, adapter): LLaVA over a CLIP tower, or Gemma 3 over a SigLIP tower (with its pooling head), 64
    wide, images of 28 pixels in 4 image tokens; the processor a release ships saved beside the weights
    (image processor, image tokens, chat template); an adapter with random B on every linear layer of the
    language model and the vision tower, as `all-linear` adapts them."""
    import transformers as tf

    from tests.export.models import VISION_LINEAR, _vision_shape, away_from_identity, small_random_adapter
    from tests.test_vlm import _model

    base = root / "base"
    torch.manual_seed(0)
    config = _model(family).config
    _vision_shape(config.vision_config, family)
    tokenizer = _tokenizer(base, family, config)
    model = type(_model(family))(config)
    away_from_identity(model)
    with torch.no_grad():  # Gemma 3 starts its projector at zero: images would change nothing
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n and not p.any():
                p.normal_(std=0.2)
    model.to(torch.bfloat16).save_pretrained(str(base))
    template = CHAT_TEMPLATE.replace("<image>", MARKER[family])
    if family == "llava":
        images = tf.CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **CLIP_NORM
        )
        extra = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        processor = tf.LlavaProcessor(images, tokenizer, chat_template=template, **extra)
    else:
        images = tf.Gemma3ImageProcessor(
            size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        processor = tf.Gemma3Processor(images, tokenizer, chat_template=template, image_seq_length=4)
    processor.save_pretrained(str(base))
    targets = (
        rf".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|{VISION_LINEAR})"
    )
    return base, small_random_adapter(model, targets, root / "adapter")


def _tokenizer(base: Path, family: str, config):
    """The demo's tokenizer with the family's image tokens, their ids set in the config."""
    from transformers import AutoTokenizer

    from qmerge.demo.tiny import build_tokenizer

    if family == "llava":
        tokenizer = build_tokenizer(base, 320, extra_special=("<image>",))
        config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
        return tokenizer
    names = {
        "boi_token": "<start_of_image>",
        "image_token": "<image_soft_token>",
        "eoi_token": "<end_of_image>",
    }
    build_tokenizer(base, 320, extra_special=tuple(names.values()))
    tokenizer = AutoTokenizer.from_pretrained(
        base, extra_special_tokens=names
    )  # Gemma 3's processor reads them
    config.boi_token_index, config.image_token_index, config.eoi_token_index = (
        tokenizer.convert_tokens_to_ids(t) for t in names.values()
    )
    return tokenizer


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A random RGB PNG (resized and cropped to 28 pixels by the processor)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


QUESTIONS = [("what is in the picture?", "a quick brown fox"), ("which colour is it?", "red and blue")]


def image_records(folder: Path, trl_column: bool = False) -> Path:
    """data.jsonl in `folder` with two images beside it: one record per question, the image named by its
    part (`path`, relative to the file) or, with `trl_column`, by TRL's `images` column."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (question, answer) in enumerate(QUESTIONS):
        write_image(folder / f"img{i}.png", i)
        part = {"type": "image"} if trl_column else {"type": "image", "path": f"img{i}.png"}
        record = {
            "messages": [
                {"role": "user", "content": [part, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ]
        }
        if trl_column:
            record["images"] = [f"img{i}.png"]
        lines.append(json.dumps(record))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"
