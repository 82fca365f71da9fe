"""`--to gguf-lora`: the adapter as a llama.cpp LoRA GGUF on a GGUF of the base weights training saw, checked
in llama.cpp against PEFT's unmerged forward (per-module scaling: rsLoRA, rank and alpha patterns; Q/K rows
permuted for llama, not for qwen2)."""

from __future__ import annotations

import pytest
import torch

from qmerge.api import export
from qmerge.demo.tiny import TinySpec, build_base
from qmerge.errors import UnsupportedError
from tests.helpers import random_adapter, reference_unmerged

llama_cpp = pytest.importorskip("llama_cpp")
SEQ = torch.tensor([[1, 17, 45, 99, 120, 7, 250, 33, 64, 81, 200, 5, 9, 300, 150, 42, 11, 12, 13, 14]])
TOL = 2e-3  # f32 base and adapter in llama.cpp (f32 KV cache) against PEFT in fp32: float order only


def _llama_cpp_logits(gguf, lora) -> torch.Tensor:
    from qmerge.llama_cpp import gguf_logits

    return gguf_logits(gguf, SEQ, lora=lora)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_gguf_in_llama_cpp_equals_peft_unmerged(tmp_path, arch):
    base = build_base(tmp_path / "base", TinySpec(arch=arch, tie_word_embeddings=arch == "qwen2"))
    adapter = random_adapter(
        base,
        tmp_path / "adapter",
        seed=2,
        b_scale=0.3,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 4},
        target_modules="all-linear",
    )
    report = export(adapter, "gguf-lora", tmp_path / "out", base=base, gguf_type="f32")
    names = {f.path for f in report.files}
    assert {"adapter.gguf", "base-f32.gguf", "Modelfile", "qmerge_provenance.json"} <= names
    assert "ADAPTER ./adapter.gguf" in (tmp_path / "out" / "Modelfile").read_text()
    ref = reference_unmerged(adapter, base, SEQ)
    got = _llama_cpp_logits(tmp_path / "out" / "base-f32.gguf", tmp_path / "out" / "adapter.gguf")
    without = _llama_cpp_logits(tmp_path / "out" / "base-f32.gguf", None)
    assert (got - ref).abs().max() <= TOL < (without - ref).abs().max()


def test_what_a_lora_gguf_cannot_carry(tmp_path, fixtures, base16):
    for adapter, what in (("adapter-dora", "DoRA"), ("adapter-rslora-patterns", "modules_to_save")):
        with pytest.raises(UnsupportedError, match=what):
            export(fixtures / adapter, "gguf-lora", tmp_path / "o", base=base16)
        assert not (tmp_path / "o").exists()


def test_check_measures_base_plus_lora(tmp_path, fixtures, base16):
    from qmerge.verify.check import check
    from qmerge.verify.metrics import Thresholds

    export(fixtures / "adapter-qlora", "gguf-lora", tmp_path / "out", base=base16, gguf_type="q8_0")
    rep = check(
        fixtures / "adapter-qlora",
        tmp_path / "out" / "base-q8_0.gguf",
        base=base16,
        thresholds=Thresholds(0.01, 0.95),
        lora=tmp_path / "out" / "adapter.gguf",
        device="cpu",
    )
    assert rep.passed and rep.candidate_kind == "gguf"
