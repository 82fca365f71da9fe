"""Gemma 3n (AltUp streams, LAuReL, per-layer embeddings, KV shared by the last layers): merged against
PEFT's unmerged forward, checked, and written as llama.cpp's gemma3n (the same file as llama.cpp's
converter: tests/export/test_gguf_converter.py), on the tiny model of tests/export/models.py, whose config
llama.cpp's fixed values allow and whose checkpoint stores the shared layers' keys and values as the
releases do."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmerge.api import check, export
from qmerge.errors import UnsupportedError
from tests.export.models import FAMILIES
from tests.export.test_gguf import SEQ, llama_cpp_logits
from tests.helpers import TINY_TEXT, kl_top1, logits_of, reference_unmerged

pytest.importorskip("llama_cpp")
NAME = "gemma3n_text"


def test_merge_equals_pefts_unmerged_model_and_checks(tmp_path, family_models):
    """Exact, the last AltUp projection included: transformers quantizes it when it loads a tied Gemma 3n in
    4-bit (it keeps the last *registered* module in 16 bits, the output layer), and qmerge dequantizes it
    (measured 2.7e-5 on logits up to 0.65, where fp32 against fp64 alone differs by 1.8e-5: activation
    sparsity makes this tiny model sensitive; 0.033 when that projection was taken as 16-bit)."""
    base, adapter = family_models[NAME]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    ref = reference_unmerged(adapter, base, SEQ)
    assert (logits_of(tmp_path / "merged", SEQ) - ref).abs().max() <= 1e-4 * ref.abs().max()
    report = check(adapter, tmp_path / "merged", base, seq_len=16, max_seqs=2)
    assert report.passed and report.metrics.max_abs_logit_diff < 1e-4


def test_gguf_against_transformers(tmp_path, family_models):
    """llama.cpp's logits on the GGUF against transformers on the merged model. They differ in the
    feed-forward only, and by llama.cpp's own arithmetic: its activation sparsity cuts at the sample
    standard deviation (n - 1) where transformers takes the population one, and its CPU GELU reads an fp16
    table. Measured: 0.028 on logits up to 0.65 (KL 5.6e-6; this tiny model is very sensitive: transformers
    alone moves by 0.45 with q8_0-rounded weights); with the feed-forward's output zeroed in both, 4e-6."""
    import gguf

    base, adapter = family_models[NAME]
    export(adapter, "bf16", tmp_path / "merged", base=base)
    report = export(tmp_path / "merged", "gguf", tmp_path / "m.gguf", gguf_type="f32")
    assert report.details["gguf_architecture"] == "gemma3n"
    ref, cand = logits_of(tmp_path / "merged", SEQ), llama_cpp_logits(tmp_path / "m.gguf")
    kl, top1 = kl_top1(ref, cand)
    assert (cand - ref).abs().max() <= 0.05 and kl <= 1e-4 and top1 >= 0.8
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("gemma3n.")}
    assert meta["gemma3n.attention.shared_kv_layers"] == 2
    assert meta["gemma3n.attention.sliding_window_pattern"] == [
        t == "sliding_attention" for t in FAMILIES[NAME]["layer_types"]
    ]
    assert meta["gemma3n.activation_sparsity_scale"][:10] == pytest.approx([1.6448533] * 10)
    assert meta["gemma3n.feed_forward_length"] == [2048] * 22
    tensors = {t.name: t for t in reader.tensors}
    assert [int(d) for d in tensors["altup_proj.weight"].shape] == [64, 64, 3]
    per_layer = tensors["per_layer_token_embd.weight"].data  # 256 rows stored, the vocabulary's 320 written
    assert per_layer.shape[0] == 320 and (per_layer[256:] == per_layer[0]).all()

    plain = tmp_path / "no-ffn"  # the rest of the graph, without the feed-forward's output
    shutil.copytree(tmp_path / "merged", plain)
    tensors = load_file(plain / "model.safetensors")
    tensors = {k: torch.zeros_like(v) if "mlp.down_proj" in k else v for k, v in tensors.items()}
    save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
    export(plain, "gguf", tmp_path / "no-ffn.gguf", gguf_type="f32")
    gap = (llama_cpp_logits(tmp_path / "no-ffn.gguf") - logits_of(plain, SEQ)).abs().max()
    assert gap <= 1e-4  # measured 4e-6


def test_gguf_as_a_candidate(tmp_path, family_models):
    base, adapter = family_models[NAME]
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    report = check(adapter, tmp_path / "m.gguf", base, seq_len=16, max_seqs=2)
    assert report.passed and report.metrics.mean_kl < 1e-4


def _config(**change) -> dict:
    return {**TINY_TEXT, "architectures": ["Gemma3nForCausalLM"], **FAMILIES[NAME], **change}


def test_what_llama_cpp_fixes_is_refused():
    from qmerge.io.gguf.families import architecture_of

    assert architecture_of(_config())[0].gguf_arch == "gemma3n"
    types = FAMILIES[NAME]["layer_types"]
    cases = [
        ({"laurel_rank": 32}, "laurel_rank is 32 where llama.cpp has 64"),
        ({"hidden_size_per_layer_input": 128}, "hidden_size_per_layer_input"),
        ({"activation_sparsity_pattern": [0.95] * 5 + [0.0] * 17}, "activation_sparsity_pattern"),
        ({"num_kv_shared_layers": 4}, "from layer 18 on"),
        ({"num_kv_shared_layers": 0}, "llama.cpp's gemma3n shares them from layer 20"),
        (
            {"layer_types": types[:18] + ["full_attention", "sliding_attention"] + types[20:]},
            "reusing layer 18",
        ),
    ]
    for change, message in cases:
        with pytest.raises(UnsupportedError, match=message):
            architecture_of(_config(**change))


def test_released_multimodal_checkpoint_maps_to_the_same_tensors(family_models):
    """Gemma 3n as released (Gemma3nForConditionalGeneration: the language model under
    model.language_model.*, beside vision and audio towers and their embedders) is written as its language
    model, tensor for tensor. (The class itself needs timm, which this machine lacks: mapped from shapes.)"""
    from safetensors import safe_open

    from qmerge.io.gguf.families import architecture_of
    from qmerge.io.gguf.writer import map_tensors

    base, _ = family_models[NAME]
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    text = {k: v for k, v in _config().items() if k != "architectures"}
    multimodal = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n"}
    multimodal["text_config"] = {**text, "model_type": "gemma3n_text"}
    released = {k.replace("model.", "model.language_model.", 1): v for k, v in shapes.items()}
    released |= {
        "model.vision_tower.timm_model.conv_stem.conv.weight": (64, 3, 3, 3),
        "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": (128, 1, 3, 3),
        "model.embed_vision.embedding_projection.weight": (64, 2048),
        "model.embed_audio.embedding.weight": (128, 1536),
    }
    arch, hp = architecture_of(_config())
    varch, vhp = architecture_of(multimodal)
    assert varch.gguf_arch == "gemma3n" and vhp.n_layers == hp.n_layers and vhp.vocab_size == hp.vocab_size
    ours = [(t.name, t.shape, t.qtype) for t in map_tensors(arch, hp, shapes, "q8_0")]
    theirs = [(t.name, t.shape, t.qtype) for t in map_tensors(varch, vhp, released, "q8_0")]
    assert sorted(ours) == sorted(theirs)


def test_calibration_refuses_gemma3n(tmp_path, family_models):
    """--calibrate writes no stacked tensors: refused before any work, with the reason."""
    base, adapter = family_models[NAME]
    data = tmp_path / "cal.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    with pytest.raises(UnsupportedError, match="does not write gemma3n models .* holds 3 stored tensors"):
        export(adapter, "gguf", tmp_path / "c.gguf", base=base, gguf_type="iq4_nl", calibrate=data)
    assert not (tmp_path / "c.gguf").exists()


def test_lora_gguf_refuses_lora_on_the_altup_projections(tmp_path, family_models):
    """all-linear adapts the AltUp projections, which llama.cpp holds as one 3-D tensor: a llama.cpp LoRA has
    no form for that; the merge route is named, nothing is written."""
    base, adapter = family_models[NAME]
    with pytest.raises(UnsupportedError, match="AltUp projections.*qmerge export ADAPTER --to gguf"):
        export(adapter, "gguf-lora", tmp_path / "lora", base=base)
    assert not (tmp_path / "lora").exists()
