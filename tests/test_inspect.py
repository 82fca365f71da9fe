"""inspect's figures against values computed independently here from the raw tensors and configs."""

from __future__ import annotations

import json
from math import prod

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import inspect_path

CONTRACT_KEYS = {"architecture", "num_parameters", "quantization", "adapter", "modules", "problems"}


def test_4bit_base_bits_per_param(base4):
    info = inspect_path(base4)
    assert info.keys() >= CONTRACT_KEYS
    bits = params = 0
    with safe_open(str(base4 / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if not key.endswith("quant_state.bitsandbytes__nf4"):
                continue
            name = key.split(".quant_state")[0]
            state = json.loads(bytes(f.get_tensor(key).tolist()))
            params += prod(state["shape"])
            for part in (name, name + ".absmax", name + ".nested_absmax"):
                t = f.get_tensor(part)
                bits += t.numel() * t.element_size() * 8
            bits += 32  # the float nested_offset
    q = info["quantization"]
    assert q["bits_per_param"] == pytest.approx(bits / params, abs=1e-4)
    assert (q["quant_type"], q["blocksize"], q["double_quant"]) == ("nf4", 64, True)
    assert q["compute_dtype"] == "bfloat16"


def test_16bit_base_and_parameter_count(base16):
    info = inspect_path(base16)
    with safe_open(str(base16 / "model.safetensors"), "pt") as f:
        expected = sum(prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info["num_parameters"] == expected and info["quantization"] is None
    assert sum(m["quantized"] for m in info["modules"]) == 14  # every linear but lm_head


def test_adapter_patterns_and_scaling(fixtures):
    info = inspect_path(fixtures / "adapter-rslora-patterns")
    cfg = json.loads((fixtures / "adapter-rslora-patterns" / "adapter_config.json").read_text())
    a = info["adapter"]
    assert a["use_rslora"] and a["modules_to_save"] == ["lm_head"]
    mods = {m["name"]: m for m in info["modules"]}
    # independent: rsLoRA scaling alpha / sqrt(r), with the patterns from the config
    assert mods["model.layers.0.self_attn.q_proj"]["lora_rank"] == cfg["rank_pattern"]["q_proj"]
    assert mods["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(16 / 4**0.5)
    assert mods["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(4 / 8**0.5)
    assert mods["model.layers.1.mlp.up_proj"]["scaling"] == pytest.approx(64 / 8**0.5)
    assert mods["model.layers.0.mlp.down_proj"]["scaling"] == pytest.approx(16 / 12**0.5)
    assert mods["lm_head"].get("replaced_by_adapter")
    assert info["problems"] == []


def test_adapter_without_base(tmp_path, fixtures):
    import shutil

    d = tmp_path / "lonely"
    shutil.copytree(fixtures / "adapter-dora", d)
    info = inspect_path(d)
    assert info["adapter"]["use_dora"] and info["num_parameters"] is None
    assert any("base not inspected" in p["message"] for p in info["problems"])
    assert all(m["lora_rank"] == 8 for m in info["modules"])


def test_problems_are_reported(copy_of, fixtures, base16):
    d = copy_of("adapter-qlora")
    t = load_file(d / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("inf")
    t["base_model.model.model.layers.5.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    t["base_model.model.model.layers.5.mlp.up_proj.lora_B.weight"] = torch.ones(128, 8)
    t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] = torch.ones(100, 8)
    save_file(t, d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 0
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    msgs = " | ".join(p["message"] for p in inspect_path(d, base=base16)["problems"])
    assert "NaN or Inf" in msgs
    assert "layers.5.mlp.up_proj, which the base does not have" in msgs
    assert "lora_B [100, 8]" in msgs
    assert "lora_alpha is 0" in msgs


def test_base_saved_after_cpu_forward_is_flagged(tmp_path, base16):
    """Reproduce the gotcha for real: save a 4-bit model after a no_grad forward on CPU."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tests.helpers import bnb_config

    model = AutoModelForCausalLM.from_pretrained(
        str(base16), quantization_config=bnb_config(torch.bfloat16), device_map="cpu"
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not getattr(layers[0], "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    model.save_pretrained(str(tmp_path / "after-forward"))
    problems = inspect_path(tmp_path / "after-forward")["problems"]
    assert any("forward pass on CPU" in p["message"] for p in problems)
    # and such a checkpoint still dequantizes exactly as bitsandbytes reads it
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState as BnbQuantState
    from safetensors.torch import load_file as load

    from qmerge.io.hf_dir import ModelDir
    from qmerge.quant.blockwise import dequantize_4bit

    raw = load(tmp_path / "after-forward" / "model.safetensors")
    md = ModelDir(tmp_path / "after-forward")
    for name in md.quantized:
        qs = {k[len(name) + 1 :]: v for k, v in raw.items() if k.startswith(name + ".")}
        ref = F.dequantize_4bit(raw[name], BnbQuantState.from_dict(qs, device=torch.device("cpu")))
        assert torch.equal(dequantize_4bit(*md.quant_state(name)), ref)
