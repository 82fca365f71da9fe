"""GGUF export of the families transformers' own classes build here (tests/export/models.py): mixture-of-experts
models (each projection's per-expert tensors stacked into one 3-D tensor, the router kept in F32, the expert
counts written) and GLM-4, checked by loading the file in llama.cpp and comparing its logits with transformers
running the merged model, on an `all-linear` adapter (on MoE models, PEFT's LoRA on the fused expert
parameters and on attention). What llama.cpp fixes and a config changes is refused."""

from __future__ import annotations

import json

import pytest

from qmerge.api import check, export
from qmerge.errors import UnsupportedError
from tests.export.models import FAMILIES, GGUF_ARCH, MOE, VLM, VLM_GGUF_ARCH, tiny_family
from tests.export.test_gguf import F32_TOL, SEQ, _tie_gap, llama_cpp_logits
from tests.helpers import TINY_TEXT, inspect_path, kl_top1, logits_of, random_adapter

pytest.importorskip("llama_cpp")


@pytest.mark.parametrize(
    "model_type", sorted(set(FAMILIES) - {"gemma3n_text"})
)  # (its own: test_gguf_gemma3n)
def test_gguf_against_transformers(tmp_path, family_models, model_type):
    base, adapter = family_models[model_type]
    if model_type in MOE:  # the experts adapted
        assert json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    ref = logits_of(tmp_path / "merged", SEQ)
    assert (ref - logits_of(base, SEQ)).abs().max() > 0.05  # the adapter changes the answer
    for gtype in ("f32", "q8_0"):
        out = tmp_path / f"m-{gtype}.gguf"
        report = export(adapter, "gguf", out, base=base, gguf_type=gtype)
        assert report.details["gguf_architecture"] == GGUF_ARCH[model_type]
        cand = llama_cpp_logits(out)
        if gtype == "f32":
            assert (cand - ref).abs().max() <= F32_TOL, model_type
        else:
            kl, _ = kl_top1(ref, cand)
            assert kl <= 1e-3 and _tie_gap(ref, cand) <= 0.05, (model_type, kl)
    info = inspect_path(tmp_path / "m-q8_0.gguf")
    arch = GGUF_ARCH[model_type]
    assert info["metadata"].get(f"{arch}.expert_count") == (4 if model_type in MOE else None)
    if model_type not in MOE:
        return
    assert info["metadata"][f"{arch}.expert_used_count"] == FAMILIES[model_type]["num_experts_per_tok"]


def test_experts_stacked_and_routers_kept_f32(tmp_path, family_models):
    import gguf

    base, adapter = family_models["qwen2_moe"]
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    T = gguf.GGMLQuantizationType
    assert [int(d) for d in tensors["blk.0.ffn_gate_exps.weight"].shape] == [64, 64, 4]  # {in, out, experts}
    assert [int(d) for d in tensors["blk.0.ffn_down_exps.weight"].shape] == [64, 64, 4]
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type == T.Q8_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32  # as llama.cpp's converter keeps routers
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == T.F32
    assert not [n for n in tensors if ".experts." in n or "exps.0" in n]
    result = check(adapter, tmp_path / "m.gguf", base, seq_len=16, max_seqs=2)  # the GGUF as a candidate
    assert result.passed and result.metrics.mean_kl < 1e-3


def test_llama_cpp_quantizer_and_calibration_on_moe(tmp_path, family_models):
    base, adapter = family_models["qwen3_moe"]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    report = export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="q4_k_m")
    assert report.details["gguf_architecture"] == "qwen3moe"
    kl, _ = kl_top1(logits_of(tmp_path / "merged", SEQ), llama_cpp_logits(tmp_path / "m.gguf"))
    assert kl <= 1e-3  # measured 8.9e-5
    data = tmp_path / "cal.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    with pytest.raises(
        UnsupportedError, match=r"does not write qwen3moe models .* holds 4 stored tensors as one"
    ):
        export(adapter, "gguf", tmp_path / "c.gguf", base=base, gguf_type="iq4_nl", calibrate=data)
    assert not (tmp_path / "c.gguf").exists()


def test_falcon_h1_quantized_by_llama_cpp(tmp_path, family_models):
    """Falcon-H1 in a type llama.cpp's quantizer writes (the SSM's convolution, A and D stay F32); calibration
    refuses its reshaped SSM tensors."""
    import gguf

    base, adapter = family_models["falcon_h1"]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="q4_k_m")
    kl, _ = kl_top1(logits_of(tmp_path / "merged", SEQ), llama_cpp_logits(tmp_path / "m.gguf"))
    assert kl <= 1e-2
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ssm_conv1d.weight"] == types["blk.0.ssm_a"] == types["blk.0.ssm_d"] == "F32"
    data = tmp_path / "cal.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    with pytest.raises(UnsupportedError, match="does not write falcon-h1 models .* reshaped"):
        export(adapter, "gguf", tmp_path / "c.gguf", base=base, gguf_type="iq4_nl", calibrate=data)


@pytest.mark.parametrize(
    "change, arch",
    [
        (dict(num_local_experts=0), "granitehybrid"),  # Granite 4.0-H Micro: the shared MLP alone
        (dict(layer_types=["attention"] * 3, position_embedding_type="rope", num_local_experts=0), "granite"),
        (dict(layer_types=["attention"] * 3, position_embedding_type="rope"), "granitemoe"),
    ],
)
def test_granite_4_without_experts_or_mamba(tmp_path, change, arch):
    """Granite 4.0's class as its other releases configure it: a Mamba hybrid whose feed-forward is the
    shared MLP alone (its length written, where the converter writes the experts'), and attention in every
    layer with RoPE, written as llama.cpp's granite or granitemoe (as the converter does)."""
    base, adapter = tiny_family(tmp_path, "granitemoehybrid", **change)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    report = export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    assert report.details["gguf_architecture"] == arch
    ref = logits_of(tmp_path / "merged", SEQ)
    assert (llama_cpp_logits(tmp_path / "m.gguf") - ref).abs().max() <= F32_TOL


def test_granite_hybrid_configs_llama_cpp_runs_otherwise_are_refused():
    from qmerge.io.gguf.families import architecture_of

    cfg = {**TINY_TEXT, "architectures": ["GraniteMoeHybridForCausalLM"], **FAMILIES["granitemoehybrid"]}
    assert architecture_of(cfg)[0].gguf_arch == "granitehybrid"
    attention_only = {**cfg, "layer_types": ["attention"] * 3, "position_embedding_type": "rope"}
    cases = [
        (cfg, {"position_embedding_type": "rope"}, "runs no RoPE"),
        (attention_only, {"position_embedding_type": None}, "granitemoe architecture runs RoPE"),
        (cfg, {"mamba_expand": 1, "mamba_d_head": 8}, "2x wide"),
        (cfg, {"mamba_proj_bias": True}, "no bias"),
        (cfg, {"hidden_act": "gelu"}, "SiLU"),
    ]
    for config, change, message in cases:
        with pytest.raises(UnsupportedError, match=message):
            architecture_of({**config, **change})


def test_gpt_neox_in_sequence_and_as_a_llama_cpp_lora(tmp_path):
    """GPT-NeoX with attention and MLP in sequence (use_parallel_residual false) against transformers, and an
    adapter on its fused Q/K/V as a llama.cpp LoRA (B's rows regrouped as the weight's) against PEFT's
    unmerged forward. Its GELU is exact in transformers and tanh-approximated in llama.cpp: measured 1.2e-4."""
    from qmerge.llama_cpp import gguf_logits
    from tests.helpers import reference_unmerged

    base, adapter = tiny_family(tmp_path, "gpt_neox", use_parallel_residual=False)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    assert (
        llama_cpp_logits(tmp_path / "m.gguf") - logits_of(tmp_path / "merged", SEQ)
    ).abs().max() <= F32_TOL
    export(adapter, "gguf-lora", tmp_path / "out", base=base, gguf_type="f32")
    got = gguf_logits(tmp_path / "out" / "base-f32.gguf", SEQ, lora=tmp_path / "out" / "adapter.gguf")
    ref = reference_unmerged(adapter, base, SEQ)
    assert (got - ref).abs().max() <= 2e-3 < (logits_of(base, SEQ) - ref).abs().max()


def test_phi_with_grouped_query_attention(tmp_path):
    """Phi with fewer key/value heads than query heads: written as config.json says (the converter writes as
    many as the queries, a file llama.cpp could not load)."""
    from qmerge.io.gguf.families import architecture_of

    base, adapter = tiny_family(tmp_path, "phi", num_key_value_heads=2)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    assert (
        llama_cpp_logits(tmp_path / "m.gguf") - logits_of(tmp_path / "merged", SEQ)
    ).abs().max() <= F32_TOL
    phi = {**TINY_TEXT, "architectures": ["PhiForCausalLM"], **FAMILIES["phi"]}
    with pytest.raises(UnsupportedError, match="no norm on the queries and keys"):
        architecture_of({**phi, "qk_layernorm": True})


def test_stablelm_2_12b_layout(tmp_path):
    """StableLM 2 12B's layout: per-head Q/K LayerNorms (stacked into one tensor each, as the converter stacks
    them: its own StableLM conversion of them fails in llama.cpp 0.3.36, "Unprocessed norms"), attention and
    MLP in parallel off one norm."""
    import gguf

    base, adapter = tiny_family(tmp_path, "stablelm", qk_layernorm=True, use_parallel_residual=True)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert [int(d) for d in tensors["blk.0.attn_k_norm.weight"].shape] == [16, 2]  # {head_dim, kv heads}
    assert (
        tensors["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
        and "blk.0.ffn_norm.weight" not in tensors
    )
    kl, _ = kl_top1(logits_of(tmp_path / "merged", SEQ), llama_cpp_logits(tmp_path / "m.gguf"))
    assert kl <= 1e-3


def test_qwen3_5_refusals(tmp_path, family_models):
    """Qwen3.5: M-RoPE sections wider than the rotated dimensions (llama.cpp aborts on them) and a llama.cpp
    LoRA on the delta-net's projections (reordered along their inputs) are refused, naming the route."""
    from qmerge.io.gguf.families import architecture_of

    cfg = {**TINY_TEXT, "architectures": ["Qwen3_5ForCausalLM"], **FAMILIES["qwen3_5_text"]}
    assert architecture_of(cfg)[0].gguf_arch == "qwen35"
    with pytest.raises(UnsupportedError, match="M-RoPE sections"):
        architecture_of({**cfg, "rope_parameters": {**cfg["rope_parameters"], "mrope_section": [11, 11, 10]}})
    base, adapter = family_models["qwen3_5_text"]
    with pytest.raises(UnsupportedError, match="LoRA on .*linear_attn.* holds those tensors reordered"):
        export(adapter, "gguf-lora", tmp_path / "lora", base=base)


def test_gpt_configs_llama_cpp_runs_otherwise_are_refused(tmp_path, family_models):
    from qmerge.io.gguf.families import architecture_of

    neox = {**TINY_TEXT, "architectures": ["GPTNeoXForCausalLM"], **FAMILIES["gpt_neox"]}
    assert architecture_of(neox)[1].n_head_kv == 4  # multi-head attention, whatever else config.json holds
    with pytest.raises(UnsupportedError, match="output layer of its own"):
        architecture_of({**neox, "tie_word_embeddings": True})
    with pytest.raises(UnsupportedError, match="GELU only"):
        architecture_of({**neox, "hidden_act": "relu"})
    with pytest.raises(UnsupportedError, match="needs the model's biases"):
        architecture_of({**neox, "attention_bias": False})
    gpt2 = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
    }
    _, hp = architecture_of({**gpt2, "vocab_size": 320})
    assert (hp.hidden, hp.n_ff, hp.n_head_kv, hp.rope_dims) == (64, 256, 4, 16)  # n_inner unset: 4 x n_embd
    for change in ({"scale_attn_by_inverse_layer_idx": True}, {"scale_attn_weights": False}):
        with pytest.raises(UnsupportedError, match="by the head size only"):
            architecture_of({**gpt2, "vocab_size": 320, **change})
    base, adapter = family_models["gpt2"]
    with pytest.raises(UnsupportedError, match="cannot carry fan_in_fan_out"):
        export(adapter, "gguf-lora", tmp_path / "lora", base=base)
    assert not (tmp_path / "lora").exists()


def test_lora_gguf_on_an_moe_base(tmp_path):
    """An attention adapter on an MoE base as a llama.cpp LoRA (the base GGUF with stacked experts) against
    PEFT's unmerged forward; LoRA on the experts is refused for gguf-lora (llama.cpp's adapter has no form
    for it) with the merge route named."""
    from qmerge.llama_cpp import gguf_logits
    from tests.helpers import reference_unmerged

    base, experts = tiny_family(tmp_path, "mixtral")
    adapter = random_adapter(
        base,
        tmp_path / "attn",
        seed=3,
        b_scale=0.3,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    export(adapter, "gguf-lora", tmp_path / "out", base=base, gguf_type="f32")
    got = gguf_logits(tmp_path / "out" / "base-f32.gguf", SEQ, lora=tmp_path / "out" / "adapter.gguf")
    ref = reference_unmerged(adapter, base, SEQ)
    assert (got - ref).abs().max() <= 2e-3 < (logits_of(base, SEQ) - ref).abs().max()
    with pytest.raises(UnsupportedError, match="LoRA on parameters.*qmerge export ADAPTER --to gguf"):
        export(experts, "gguf-lora", tmp_path / "lora", base=base)


def test_moe_configs_llama_cpp_runs_otherwise_are_refused():
    from qmerge.io.gguf.families import architecture_of

    cfg = {**TINY_TEXT, "architectures": ["Qwen3MoeForCausalLM"], **FAMILIES["qwen3_moe"]}
    assert architecture_of(cfg)[0].gguf_arch == "qwen3moe"
    cases = [
        ({"norm_topk_prob": False}, "renormalizes"),
        ({"mlp_only_layers": [1]}, "dense layers"),
        ({"decoder_sparse_step": 2}, "dense layers"),
        ({"num_experts_per_tok": 0}, "expert counts"),
    ]
    for change, message in cases:
        with pytest.raises(UnsupportedError, match=message):
            architecture_of({**cfg, **change})
    qwen2 = {**TINY_TEXT, "architectures": ["Qwen2MoeForCausalLM"], **FAMILIES["qwen2_moe"]}
    with pytest.raises(UnsupportedError, match="keeps"):
        architecture_of({**qwen2, "norm_topk_prob": True})
    with pytest.raises(UnsupportedError, match="output layer of its own"):
        architecture_of({**qwen2, "tie_word_embeddings": True})
    olmoe = {**TINY_TEXT, "architectures": ["OlmoeForCausalLM"], **FAMILIES["olmoe"]}
    assert architecture_of(olmoe)[0].gguf_arch == "olmoe"
    with pytest.raises(UnsupportedError, match="key/value heads"):
        architecture_of({**olmoe, "num_key_value_heads": 2})
    with pytest.raises(UnsupportedError, match="clip_qkv"):
        architecture_of({**olmoe, "clip_qkv": 8.0})


@pytest.mark.parametrize("name", sorted(VLM))
def test_vision_language_models_language_gguf(tmp_path, vlm_models, name):
    """The language model of a vision-language checkpoint as llama.cpp's text GGUF, against transformers'
    image-text-to-text class on text; the report says the image side is not in the file.

    Qwen2-VL's tiny models have an RMSNorm epsilon of 1e-12: llama.cpp 0.3.36's qwen2vl never reads the
    epsilon the file carries (qmerge writes it, as llama.cpp's converter does) and uses 0, which at 1e-5
    moved these tiny logits by 9.8e-3 (by 9e-4 at Qwen2-VL's own 1e-6); at 1e-12 the GGUF matches to 2.4e-7."""
    from transformers import AutoModelForImageTextToText

    base, adapter = vlm_models[name]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    ref = logits_of(tmp_path / "merged", SEQ, model_class=AutoModelForImageTextToText)
    assert (ref - logits_of(base, SEQ, model_class=AutoModelForImageTextToText)).abs().max() > 0.05
    report = export(adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    assert report.details["gguf_architecture"] == VLM_GGUF_ARCH[name]
    assert any("mmproj" in w for w in report.warnings)
    assert (llama_cpp_logits(tmp_path / "m.gguf") - ref).abs().max() <= F32_TOL


def test_lora_gguf_on_a_vision_language_base(tmp_path, vlm_models):
    """gguf-lora on a vision-language model: the language model's base GGUF and the adapter, in llama.cpp
    against PEFT's unmerged image-text-to-text model on text; the report says the image side is left out."""
    from transformers import AutoModelForImageTextToText

    from qmerge.llama_cpp import gguf_logits
    from tests.helpers import reference_unmerged

    base, adapter = vlm_models["qwen2_5_vl"]
    report = export(adapter, "gguf-lora", tmp_path / "out", base=base, gguf_type="f32")
    assert any("mmproj" in w for w in report.warnings)
    got = gguf_logits(tmp_path / "out" / "base-f32.gguf", SEQ, lora=tmp_path / "out" / "adapter.gguf")
    ref = reference_unmerged(adapter, base, SEQ, model_class=AutoModelForImageTextToText)
    assert (got - ref).abs().max() <= F32_TOL  # measured 1.8e-7


@pytest.mark.parametrize(
    "model_type",
    ["falcon_h1", "jamba", "qwen3_next", "granitemoehybrid", "bamba", "granitemoe", "granitemoeshared"]
    + ["gpt_neox", "gpt2", "phi", "stablelm", "starcoder2", "qwen3_5_text"],
)
def test_merges_equal_pefts_unmerged_model(tmp_path, family_models, model_type):
    """The merges of the families only these tests build (Jamba's, Qwen3-Next's and Granite's fused experts
    adapted through target_parameters) against PEFT's unmerged forward over the NF4 base (measured 5.1e-6,
    2.7e-7, 3.9e-6 on logits up to 0.42, 0.66, 1.19; the others 1.5e-7 to 3.6e-7)."""
    from tests.helpers import reference_unmerged

    base, adapter = family_models[model_type]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    ref = reference_unmerged(adapter, base, SEQ)
    assert (logits_of(tmp_path / "merged", SEQ) - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_qwen3_vl_moe_experts_in_their_released_layout(tmp_path, vlm_models):
    """A Qwen3-VL-MoE base as released, its fused experts [experts, in, out] (transformers transposes them
    when it loads them): accepted, LoRA on the experts (target_parameters) merged into that layout equal to
    PEFT's unmerged model (measured 1.8e-7), and the GGUF, split and transposed as llama.cpp holds them,
    against transformers on the merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from tests.helpers import reference_unmerged

    base, _ = vlm_models["qwen3_vl_moe"]
    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=experts, init_lora_weights=False
    )
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    peft.save_pretrained(tmp_path / "adapter")
    export(tmp_path / "adapter", "fp32", tmp_path / "merged", base=base)
    got = logits_of(tmp_path / "merged", SEQ, model_class=AutoModelForImageTextToText)
    ref = reference_unmerged(tmp_path / "adapter", base, SEQ, model_class=AutoModelForImageTextToText)
    assert (got - ref).abs().max() < 1e-5 and (
        ref - logits_of(base, SEQ, AutoModelForImageTextToText)
    ).abs().max() > 0.05
    export(tmp_path / "adapter", "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    assert (
        llama_cpp_logits(tmp_path / "m.gguf") - got
    ).abs().max() <= F32_TOL  # measured 6e-5, as Qwen3-VL's
