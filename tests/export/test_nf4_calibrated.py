"""`--to nf4 --calibrate`: a standard bitsandbytes 4-bit checkpoint that transformers loads unchanged, whose
codes keep more of the fine-tune than plain rounding on the calibration data."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import torch

from qmerge.api import export


def _data(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"colour of {a}"}, {"role": "assistant", "content": b}]}
        for a, b in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
    ]
    p = tmp_path / "cal.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_calibrated_nf4_loads_and_keeps_more_of_the_delta(tmp_path, fixtures, base16):
    from transformers import AutoModelForCausalLM

    from qmerge.io.hf_dir import ModelDir
    from qmerge.quant.blockwise import dequantize_4bit
    from qmerge.verify.check import check
    from qmerge.verify.metrics import Thresholds

    adapter, cal = fixtures / "adapter-qlora", _data(tmp_path)
    stages = []
    report = export(
        adapter, "nf4", tmp_path / "cal", base=base16, calibrate=cal, progress=lambda *a: stages.append(a)
    )
    calibration = [s for s in stages if s[0].startswith("calibration: ")]  # the stage named, N of M layers
    assert calibration[0] == ("calibration: 0 of 14 layers (the forward pass starts)", 0, 14)
    assert calibration[-1][0].startswith("calibration: 14 of 14 layers (model.layers.1.")
    plain = export(adapter, "nf4", tmp_path / "plain", base=base16)
    c = report.details["calibration"]
    assert c["tokens"] > 10 and c["output_error_vs_rounding"] < 1.0 and len(c["layers"]) == 14
    assert report.details["delta_retention"]["total"] > plain.details["delta_retention"]["total"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cal"), device_map="cpu")  # no arguments
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ours = ModelDir(tmp_path / "cal")
    assert len(layers) == 14
    for name, m in layers.items():  # bitsandbytes reads back exactly the codes and scales written
        theirs = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert torch.equal(theirs, dequantize_4bit(*ours.quant_state(name + ".weight"))), name
    kl = {}
    for d in ("cal", "plain"):
        rep = check(
            adapter, tmp_path / d, base=base16, thresholds=Thresholds(None, None), data=cal, device="cpu"
        )
        kl[d] = rep.metrics.mean_kl
    assert kl["cal"] < kl["plain"]
