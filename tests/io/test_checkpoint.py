"""Model directories, bnb 4-bit checkpoints and adapters as transformers and PEFT write them."""

from __future__ import annotations

import json
import shutil

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.functional import QuantState as BnbQuantState

from qmerge.errors import InputError, UnsupportedError
from qmerge.io.adapter import Adapter, resolve_adapter_dir
from qmerge.io.hf_dir import ModelDir
from qmerge.quant.blockwise import dequantize_4bit


def test_4bit_checkpoint_every_quant_state_key(base4):
    from safetensors.torch import load_file

    model = ModelDir(base4)
    assert model.is_4bit and len(model.quantized) == 14
    raw = load_file(base4 / "model.safetensors")
    for name in model.quantized:
        packed, state = model.quant_state(name)
        # bitsandbytes' own reader of the same saved tensors is the reference
        qs = {k[len(name) + 1 :]: v for k, v in raw.items() if k.startswith(name + ".")}
        ref_state = BnbQuantState.from_dict(qs, device=torch.device("cpu"))
        assert torch.equal(dequantize_4bit(packed, state), F.dequantize_4bit(raw[name], ref_state))
        assert state.double_quant and state.quant_type == "nf4" and state.blocksize == 64


def test_prefetched_reads_are_the_same_tensors_and_stay_bounded(base4):
    from safetensors.torch import load_file

    model = ModelDir(base4)
    raw = load_file(base4 / "model.safetensors")
    names = sorted(model.quantized)
    for i, name in enumerate(names):
        if i + 1 < len(names):
            model.store.prefetch(model.stored_parts(names[i + 1]))
        for part in model.stored_parts(name):
            if part in raw:
                assert torch.equal(model.store.get(part), raw[part])
        # what is read ahead never covers more than the next two calls' tensors
        assert len(model.store._ahead) <= 2 * len(model.stored_parts(name))
    model.store.prefetch(["not.a.tensor", names[0]])  # unknown names are ignored; a get takes the result
    assert torch.equal(model.store.get(names[0]), raw[names[0]]) and not model.store._ahead


def test_weight_names_hide_companions(base4, base16):
    assert sorted(ModelDir(base4).weight_names()) == sorted(ModelDir(base16).weight_names())


def test_sharded_directory(tmp_path, base16):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(base16)).save_pretrained(
        str(tmp_path / "s"), max_shard_size="100KB"
    )
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    sharded, single = ModelDir(tmp_path / "s"), ModelDir(base16)
    assert len(sharded.store.files) > 1
    for name in single.weight_names():
        assert torch.equal(sharded.store.get(name), single.store.get(name))


def test_missing_config_and_missing_shard(tmp_path, base16):
    with pytest.raises(InputError, match="no config.json"):
        ModelDir(tmp_path)
    d = tmp_path / "m"
    shutil.copytree(base16, d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002.safetensors"}})
    )
    with pytest.raises(InputError, match="model-00002.safetensors"):
        ModelDir(d)


def test_pickle_only_with_permission(tmp_path, base16):
    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(base16 / "config.json", d)
    torch.save({"w": torch.ones(2)}, d / "model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        ModelDir(d)
    assert torch.equal(ModelDir(d, allow_pickle=True).store.get("w"), torch.ones(2))


def test_adapter_layout(fixtures):
    ad = Adapter(fixtures / "adapter-rslora-patterns")
    assert len(ad.layout.lora) == 14
    assert set(ad.layout.replace) == {"lm_head.weight"}
    dora = Adapter(fixtures / "adapter-dora")
    assert all(m.magnitude for m in dora.layout.lora.values())


def test_checkpoint_folders(fixtures):
    assert resolve_adapter_dir(fixtures / "adapter-qlora" / "checkpoint-12").name == "checkpoint-12"
    with pytest.raises(InputError, match="is a model directory"):
        resolve_adapter_dir(fixtures / "tiny-llama-bf16")


def test_trainer_output_without_adapter_points_to_checkpoint(tmp_path, fixtures):
    shutil.copytree(fixtures / "adapter-qlora" / "checkpoint-12", tmp_path / "run" / "checkpoint-12")
    with pytest.raises(InputError, match="checkpoint-12"):
        resolve_adapter_dir(tmp_path / "run")


def test_unknown_adapter_tensor_is_an_error(copy_of):
    from safetensors.torch import load_file, save_file

    d = copy_of("adapter-qlora")
    t = load_file(d / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_X.weight"] = torch.zeros(2, 2)
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match="lora_X"):
        Adapter(d)


def test_non_lora_adapter_is_refused(copy_of):
    d = copy_of("adapter-qlora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="IA3"):
        Adapter(d)
