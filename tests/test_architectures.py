"""Merges on architectures beyond the fixtures' Llama, each base and adapter made directly by transformers
and PEFT, checked against PEFT's unmerged forward (fp32) like the fixtures are."""

from __future__ import annotations

import json

import pytest
import torch

from qmerge.api import merge
from tests.helpers import logits_of, random_adapter, reference_unmerged

FP32_TOL = 1e-4
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=320,
    max_position_embeddings=128,
)
ARCHS = {
    # model_type: (config extras, LoraConfig extras)
    "qwen3": (dict(num_key_value_heads=2, head_dim=16), {}),
    "gemma": (dict(num_key_value_heads=2, head_dim=16), {}),
    "gemma2": (dict(num_key_value_heads=2, head_dim=16), {}),
    "gemma3_text": (dict(num_key_value_heads=2, head_dim=16), {}),
    "phi3": (dict(num_key_value_heads=2, pad_token_id=0), {}),
    "gpt_neox": ({}, dict(bias="all")),
    "opt": (
        dict(ffn_dim=128, word_embed_proj_dim=64, intermediate_size=None),
        {},
    ),
    # transformers 5 fuses the per-expert linears the checkpoint holds into 3-D parameters at load time
    "qwen2_moe": (
        dict(
            num_key_value_heads=2, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64
        ),
        {},
    ),
}


def make_base_and_adapter(root, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra, lora_extra = ARCHS[model_type]
    kw = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).to(torch.bfloat16)
    with torch.no_grad():  # norm weights away from their init, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(root / "base"))
    adapter = random_adapter(
        root / "base", root / "adapter", r=4, lora_alpha=8, target_modules="all-linear", **lora_extra
    )
    return root / "base", adapter


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_fp32_merge_equals_unmerged(tmp_path, model_type):
    base, adapter = make_base_and_adapter(tmp_path, model_type)
    merge(adapter, tmp_path / "m", base=base, dtype="fp32")
    ref = reference_unmerged(adapter, base)
    cand = logits_of(tmp_path / "m")
    assert (cand - ref).abs().max() <= FP32_TOL


def test_moe_experts_fused_at_load_merge_and_check(tmp_path):
    """A MoE checkpoint holds one tensor per expert where the model has one fused 3-D parameter: merge keeps
    the checkpoint's layout (transformers loads it, above), and the streamed check builds each fused
    parameter from its pieces with transformers' own conversion, as from_pretrained does."""
    from qmerge.verify.check import check

    base, adapter = make_base_and_adapter(tmp_path, "qwen2_moe")
    merge(adapter, tmp_path / "m", base=base, dtype="fp32")
    report = check(adapter, tmp_path / "m", base=base, device="cpu")
    assert report.passed and report.metrics.max_abs_logit_diff < 1e-4


def _merged_exactly_and_checked(tmp_path, targets: list[str] | str):
    """A PEFT adapter on tmp_path/base's `targets`, merged in fp32 (asserted equal to PEFT's unmerged
    forward) and checked by the streamed check: its report."""
    from qmerge.api import check

    base = tmp_path / "base"
    adapter = random_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets)
    merge(adapter, tmp_path / "merged", base, dtype="fp32")
    assert (logits_of(tmp_path / "merged") - reference_unmerged(adapter, base)).abs().max() < FP32_TOL
    return check(adapter, tmp_path / "merged", base, device="cpu", seq_len=16, max_seqs=2)


def test_falcon_h1_config_with_special_floats(tmp_path):
    """A Mamba-2 hybrid whose config.json holds time_step_limit [0, {"__float__": "Infinity"}] (as
    transformers writes infinity): read as AutoConfig.from_pretrained reads it; merged and checked."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(0)
    cfg = FalconH1Config(
        **COMMON,
        num_key_value_heads=2,
        head_dim=16,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
    )
    FalconH1ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    assert "__float__" in (tmp_path / "base" / "config.json").read_text()
    # PEFT refuses LoRA on Mamba's out_proj
    assert _merged_exactly_and_checked(tmp_path, ["q_proj", "v_proj", "in_proj", "down_proj"]).passed


MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_expand=1)


def _mamba2_hybrid(family: str):
    """Tiny Bamba, Granite 4.0-H (granitemoehybrid, with experts) and Zamba2: one Mamba-2 layer and one
    with attention each."""
    import transformers as tf

    if family == "bamba":
        return tf.BambaForCausalLM(
            tf.BambaConfig(**COMMON, num_key_value_heads=2, attn_layer_indices=[1], **MAMBA2)
        )
    if family == "granitemoehybrid":
        cfg = tf.GraniteMoeHybridConfig(
            **COMMON, num_key_value_heads=2, layer_types=["mamba", "attention"], **MAMBA2
        )
        cfg.num_local_experts, cfg.num_experts_per_tok, cfg.shared_intermediate_size = 4, 2, 128
        return tf.GraniteMoeHybridForCausalLM(cfg)
    zamba = dict(num_key_value_heads=4, mamba_d_state=8, mamba_ngroups=1, n_mamba_heads=4, mamba_headdim=32)
    cfg = tf.Zamba2Config(**COMMON, **zamba, layers_block_type=["mamba", "hybrid"], use_mem_rope=False)
    return tf.Zamba2ForCausalLM(cfg)


@pytest.mark.parametrize("family", ["bamba", "granitemoehybrid", "zamba2"])
def test_mamba2_hybrids(tmp_path, family):
    """The other Mamba-2 hybrids (Bamba and Granite 4.0-H write time_step_limit with an infinity into
    config.json, as Falcon-H1 does): read, merged exactly and checked; Granite 4.0-H with `all-linear`."""
    torch.manual_seed(0)
    _mamba2_hybrid(family).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    if family != "zamba2":
        assert "__float__" in (tmp_path / "base" / "config.json").read_text()
    targets = "all-linear" if family == "granitemoehybrid" else ["q_proj", "v_proj", "in_proj"]
    result = _merged_exactly_and_checked(tmp_path, targets)
    assert result.passed and result.metrics.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("model_type", ["qwen3_5_text", "gemma4_text"])
def test_qwen3_5_and_gemma_4(tmp_path, model_type):
    """Qwen3.5's language model (gated delta-net layers, gated attention) and Gemma 4's: merged exactly
    (measured 1.9e-7 and 1.8e-6 on these tiny models) and passed by the streamed check."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(num_key_value_heads=2, head_dim=16)
    if model_type == "qwen3_5_text":  # (one full-attention layer: transformers' cache needs one)
        extra |= dict(num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4)
        extra |= dict(linear_key_head_dim=16, linear_value_head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **extra}))
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    result = _merged_exactly_and_checked(tmp_path, "all-linear")
    assert result.passed and result.metrics.max_abs_logit_diff < 1e-4


def test_llama4_streamed_check(tmp_path):
    """Llama 4 sends the token ids to its embedding's device inside its forward: the streamed check (whose
    weights are offloaded) runs it, and measures the merge as exact."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        **{**COMMON, "max_position_embeddings": 256},
        intermediate_size_mlp=128,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        pad_token_id=0,
        attention_chunk_size=64,
    )
    Llama4ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    result = _merged_exactly_and_checked(tmp_path, ["q_proj", "v_proj"])
    assert result.passed and result.metrics.max_abs_logit_diff < 1e-4


def test_4bit_layers_of_a_tied_model_are_those_transformers_quantizes(tmp_path):
    """transformers keeps the last registered module in 16 bits when it loads in 4-bit; the weights are not
    tied yet then, so on a tied model that is the output layer, not the module before it (Gemma 3n's last
    AltUp projection, a linear layer it does quantize)."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    from qmerge.io.hf_meta import quantized_linears
    from tests.helpers import bnb_config

    kw = {**COMMON, "num_hidden_layers": 4, "num_key_value_heads": 2, "head_dim": 16, "laurel_rank": 64}
    kw |= dict(hidden_size_per_layer_input=64, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 4)
    kw["layer_types"] = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3n_text", **kw)).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config(), device_map="cpu"
    )
    theirs = {n + ".weight" for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ours = quantized_linears(json.loads((tmp_path / "config.json").read_text()))
    assert ours == theirs and "model.altup_unembed_projections.2.weight" in ours


def test_a_package_the_model_class_needs_is_named():
    """Gemma 3n as released (its vision tower is timm's): where timm is missing, the message names the
    packages to install, not config.json."""
    import importlib.util

    from qmerge.errors import InputError
    from qmerge.io.hf_meta import meta_model

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    text = {**COMMON, "model_type": "gemma3n_text", "num_key_value_heads": 2, "head_dim": 16}
    text |= dict(num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"])
    text["activation_sparsity_pattern"] = [0.0, 0.0]
    config = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text,
    }
    with pytest.raises(InputError, match=r"transformers needs .*timm.* pip install .*timm"):
        meta_model(config)
