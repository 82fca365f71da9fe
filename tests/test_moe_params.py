"""LoRA on parameters (PEFT's target_parameters, which `all-linear` picks on MoE models for the fused 3-D
expert parameters and the router): merged as PEFT's ParamWrapper computes the delta, into the layout the
checkpoint stores (per-expert linears split back by transformers' own conversion, or a fused tensor as
gpt-oss stores it), checked against PEFT's unmerged forward and by the streamed check."""

from __future__ import annotations

import json

import pytest
import torch

from qmerge.api import check, describe, export, merge
from qmerge.errors import UnsupportedError
from tests.helpers import TINY_TEXT, logits_of, reference_unmerged

# Linear dims are whole 64-value blocks: bitsandbytes 0.50.2 on CPU dequantizes a 2-D weight whose rows
# are not whole blocks wrongly (its flat and 2-D results differ), which would blur the reference.
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "mixtral": dict(
        num_local_experts=4, num_experts_per_tok=2
    ),  # stored as block_sparse_moe.experts.N.w1/w2/w3
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        moe_intermediate_size=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    ),
    "qwen3_next": dict(
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=64,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention"],
    ),
}


def _make(tmp_path, model_type: str, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = FAMILIES.get(model_type, {})
    config = AutoConfig.for_model(model_type, **{**TINY_TEXT, **extra, **lora.pop("config", {})})
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "base"))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "base", tmp_path / "adapter"


def _merged_equals_peft(tmp_path, base, adapter):
    merge(adapter, tmp_path / "merged", base, dtype="fp32")
    ref = reference_unmerged(adapter, base)
    without = logits_of(base)
    got = logits_of(tmp_path / "merged")
    assert (got - ref).abs().max() < 1e-5 < (without - ref).abs().max()
    result = check(adapter, tmp_path / "merged", base, device="cpu", seq_len=16, max_seqs=2)
    assert result.passed and result.metrics.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_all_linear_moe_adapter(tmp_path, model_type):
    base, adapter = _make(tmp_path, model_type, target_modules="all-linear")
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    assert "gate_up_proj" in targets and "down_proj" in targets  # PEFT's all-linear on an MoE
    _merged_equals_peft(tmp_path, base, adapter)


def test_gpt_oss_fused_experts_stored_fused(tmp_path):
    """gpt-oss stores its experts fused ([experts, in, out], is_transposed) with biases: the delta goes into
    the stored tensor itself."""
    config = dict(
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=32,
    )
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    base, adapter = _make(
        tmp_path, "gpt_oss", config=config, target_modules=["q_proj"], target_parameters=targets
    )
    _merged_equals_peft(tmp_path, base, adapter)


def test_parameter_lora_is_described_and_refused_where_it_has_no_form(tmp_path):
    base, adapter = _make(tmp_path, "mixtral", target_modules="all-linear")
    info = describe(adapter, base).to_json()
    assert {"gate_up_proj", "down_proj", "gate.weight"} <= set(info["adapter"]["target_parameters"])
    rows = {m["name"]: m for m in info["modules"]}
    # PEFT gives the fused gate and up projection rank 2r (rank_pattern); w1/w3 are its pieces, w2 down
    assert rows["model.layers.0.block_sparse_moe.experts.0.w1"]["lora_rank"] == 8
    assert rows["model.layers.0.block_sparse_moe.experts.0.w2"]["lora_rank"] == 4
    assert not [p for p in info["problems"] if p["severity"] == "error"]
    with pytest.raises(
        UnsupportedError, match="LoRA on parameters"
    ):  # a llama.cpp adapter has no form for it
        export(adapter, "gguf-lora", tmp_path / "lora", base=base)
    assert not (tmp_path / "lora").exists()


def test_a_parameter_lora_for_another_model_is_refused(tmp_path):
    from qmerge.errors import MismatchError

    base, adapter = _make(tmp_path, "qwen3_moe", target_modules="all-linear")
    other = tmp_path / "other"
    other.mkdir()
    _make(other, "qwen3_moe", target_modules="all-linear", config=dict(moe_intermediate_size=64))
    with pytest.raises(MismatchError, match="does not fit the parameter"):
        merge(adapter, tmp_path / "m", other / "base")
