"""A tiny LLaVA base with the processor a released one ships (image processor, `<image>` token, chat
template that renders image parts), a QLoRA-style adapter on its language model and vision tower, and
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


def tiny_llava(root: Path) -> tuple[Path, Path]:
    """(base, adapter): LLaVA over a CLIP tower 64 wide, images of 28 pixels in 4 patches (4 image tokens),
    its processor saved beside the weights; an adapter with random B on every linear layer of the language
    model and the vision tower, as `all-linear` adapts them."""
    import transformers as tf

    from qmerge.demo.tiny import build_tokenizer
    from tests.export.models import VISION_LINEAR, _vision_shape, away_from_identity, small_random_adapter
    from tests.test_vlm import _model

    base = root / "base"
    tokenizer = build_tokenizer(base, 320, extra_special=("<image>",))
    torch.manual_seed(0)
    config = _model("llava").config
    _vision_shape(config.vision_config, "llava")
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    model = tf.LlavaForConditionalGeneration(config)
    away_from_identity(model)
    model.to(torch.bfloat16).save_pretrained(str(base))
    images = tf.CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **CLIP_NORM
    )
    tf.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(str(base))
    targets = (
        rf".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|{VISION_LINEAR})"
    )
    return base, small_random_adapter(model, targets, root / "adapter")


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
