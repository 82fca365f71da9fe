"""Vision-language models as transformers builds them for fine-tuning (image-text-to-text): tiny random
models of seven families, adapted by PEFT on their language model as users do; the merge equals PEFT's
unmerged forward (AutoModelForImageTextToText over a bitsandbytes NF4 base) on text, the streamed check
runs (old and new checkpoint key layouts, tied embeddings, self.device, an embedding larger than the
output layer), inspect finds no problem, and the folder keeps the processor's files."""

from __future__ import annotations

import json

import pytest
import torch

from qmerge.api import check, describe, merge
from tests.helpers import TINY_TEXT, TOKENS, logits_of, reference_unmerged

T = dict(TINY_TEXT, max_position_embeddings=256)
MROPE = {"type": "mrope", "mrope_section": [2, 2, 4]}
SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _model(kind: str):
    import transformers as tf

    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14)
        cfg = tf.Qwen2VLConfig(
            text_config=dict(T, rope_scaling=MROPE), vision_config=vision, image_token_id=300
        )
        return tf.Qwen2VLForConditionalGeneration(cfg)
    if kind == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        cfg = tf.Qwen2_5_VLConfig(
            text_config=dict(T, rope_scaling=MROPE), vision_config=dict(vision, fullatt_block_indexes=[0])
        )
        return tf.Qwen2_5_VLForConditionalGeneration(cfg)
    if kind == "qwen3_vl":
        rope = {"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        vision |= dict(deepstack_visual_indexes=[1], num_position_embeddings=64)
        return tf.Qwen3VLForConditionalGeneration(
            tf.Qwen3VLConfig(text_config=dict(T, rope_scaling=rope), vision_config=vision)
        )
    if kind == "llava":
        vision = dict(SMALL_VISION, model_type="clip_vision_model", image_size=28, patch_size=14)
        cfg = tf.LlavaConfig(
            text_config=dict(T, model_type="llama"), vision_config=vision, image_token_index=300
        )
        return tf.LlavaForConditionalGeneration(cfg)
    if kind == "gemma3":  # checkpoints in the older language_model.model.* layout, tied embeddings
        text = dict(T, model_type="gemma3_text", sliding_window=64)
        vision = dict(SMALL_VISION, image_size=28, patch_size=14)
        cfg = tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=300
        )
        return tf.Gemma3ForConditionalGeneration(cfg)
    if kind == "mistral3":
        vision = dict(SMALL_VISION, model_type="pixtral", image_size=28, patch_size=14, head_dim=16)
        cfg = tf.Mistral3Config(
            text_config=dict(T, model_type="mistral"), vision_config=vision, spatial_merge_size=1
        )
        return tf.Mistral3ForConditionalGeneration(cfg)
    if kind == "idefics3":  # its forward moves the embeddings to self.device
        vision = dict(SMALL_VISION, image_size=28, patch_size=14)
        cfg = tf.Idefics3Config(text_config=dict(T, model_type="llama"), vision_config=vision, scale_factor=1)
        return tf.Idefics3ForConditionalGeneration(cfg)
    if kind == "mllama":  # cross-attention layers; an embedding 8 rows larger than the output layer
        text = dict(T, cross_attention_layers=[1], pad_token_id=0)
        text.pop("head_dim")
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1)
        vision |= dict(attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64, max_num_tiles=1)
        vision |= dict(intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
        return tf.MllamaForConditionalGeneration(tf.MllamaConfig(text_config=text, vision_config=vision))
    raise KeyError(kind)


FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "mistral3", "idefics3", "mllama"]


def _make(tmp_path, kind):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = _model(kind).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "tiny"}))
    targets = r".*(language_model|text_model).*\.(q_proj|v_proj|up_proj)"
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("kind", FAMILIES)
def test_vision_language_model(tmp_path, kind):
    from transformers import AutoModelForImageTextToText

    base, adapter = _make(tmp_path, kind)
    assert not [p for p in describe(adapter, base).problems if p.severity == "error"]
    report = merge(adapter, tmp_path / "merged", base, dtype="fp32")
    assert report.num_tensors_merged == 6  # q/v/up of two language-model layers
    assert (tmp_path / "merged" / "preprocessor_config.json").exists()  # served as a VLM, with its processor
    ref = reference_unmerged(adapter, base, TOKENS[:, :10], model_class=AutoModelForImageTextToText)
    got = logits_of(tmp_path / "merged", TOKENS[:, :10], AutoModelForImageTextToText)
    assert (got - ref).abs().max() < 2e-5 * ref.abs().max()
    result = check(adapter, tmp_path / "merged", base, device="cpu", seq_len=16, max_seqs=2)
    assert result.passed and result.metrics.max_abs_logit_diff < 1e-4
