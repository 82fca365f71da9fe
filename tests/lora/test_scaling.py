"""Scaling and pattern resolution against PEFT's own functions and layers."""

from __future__ import annotations

import pytest
from peft.utils.other import get_pattern_key as peft_get_pattern_key

from qmerge.io.adapter import Adapter
from qmerge.lora.scaling import get_pattern_key, module_scaling

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.11.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]
PATTERNS = ["q_proj", "layers.1.mlp.up_proj", "mlp.down_proj", "layers\\.1\\d\\.mlp\\..*", "proj"]


@pytest.mark.parametrize("name", NAMES)
def test_pattern_key_matches_peft(name):
    assert get_pattern_key(PATTERNS, name) == peft_get_pattern_key(PATTERNS, name)


@pytest.mark.parametrize("adapter", ["adapter-qlora", "adapter-rslora-patterns", "adapter-dora"])
def test_scaling_matches_peft_layers(fixtures, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(fixtures / "tiny-llama-bf16")), str(fixtures / adapter)
    )
    ad = Adapter(fixtures / adapter)
    seen = 0
    for name, module in model.base_model.model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            assert module_scaling(ad.settings, name) == pytest.approx(module.scaling["default"], rel=1e-12)
            seen += 1
    assert seen == 14
