"""NF4 export: loads in transformers with no arguments, equals bitsandbytes' own quantization, reports retention."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import torch

from qmerge.api import export, merge
from qmerge.formats.nf4 import NF4Options
from tests.helpers import TOKENS, inspect_path


def _dequantized_linears(model) -> dict[str, torch.Tensor]:
    return {
        n: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).clone()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def test_nf4_export_equals_bitsandbytes_quantizing_the_merge(tmp_path, fixtures, base16):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = fixtures / "adapter-qlora"
    report = export(adapter, "nf4", tmp_path / "nf4", base=base16)
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"), device_map="cpu")  # no extra arguments
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    # reference: the same merged weights (bf16) quantized by bitsandbytes at load time
    merge(adapter, tmp_path / "bf16", base=base16, dtype="bf16")
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "bf16"), quantization_config=cfg, device_map="cpu"
    )
    a, b = _dequantized_linears(ours), _dequantized_linears(theirs)
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ours, theirs = ours.dequantize().float().eval(), theirs.dequantize().float().eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=TOKENS).logits, theirs(input_ids=TOKENS).logits)
    ret = report.details["delta_retention"]
    assert 0.0 <= ret["total"] <= 1.0 and len(ret["layers"]) == 14
    prov = json.loads((tmp_path / "nf4" / "qmerge_provenance.json").read_text())
    assert prov["delta_retention"]["total"] == ret["total"]


def test_nf4_export_inspect_and_options(tmp_path, fixtures, base16):
    export(
        fixtures / "adapter-dora",
        "nf4",
        tmp_path / "a",
        base=base16,
        nf4=NF4Options(blocksize=128, double_quant=False),
    )
    q = inspect_path(tmp_path / "a")["quantization"]
    assert q["blocksize"] == 128 and not q["double_quant"]
    # 4 bits per weight + one fp32 absmax per 128 weights
    assert abs(q["bits_per_param"] - (4 + 32 / 128)) < 1e-9


def test_nf4_check_reports_drift(tmp_path, fixtures, base16):
    from qmerge.verify.check import check
    from qmerge.verify.metrics import Thresholds

    export(fixtures / "adapter-qlora", "nf4", tmp_path / "nf4", base=base16)
    rep = check(
        fixtures / "adapter-qlora", tmp_path / "nf4", base=base16, thresholds=Thresholds(None, None, None)
    )
    assert rep.candidate_kind == "nf4" and rep.passed and rep.metrics.max_abs_logit_diff > 0
    assert 0.0 <= rep.to_json()["delta_retention"] <= 1.0
