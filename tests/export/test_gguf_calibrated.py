"""`--to gguf --gguf-type iq4_nl|q4_0 --calibrate` and `--to gguf-lora ... --calibrate`: GGUF files encoded by
qmerge in llama.cpp's block formats, loaded and run by llama.cpp, measured by `qmerge check` against PEFT's
unmerged model, and compared with llama.cpp's own quantizer of the same type."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from qmerge.api import export
from qmerge.cli import cli
from qmerge.verify.check import check
from qmerge.verify.metrics import Thresholds

pytest.importorskip("llama_cpp")


def _data(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"colour of {a}"}, {"role": "assistant", "content": b}]}
        for a, b in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")] * 4
    ]
    p = tmp_path / "cal.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _kl(adapter, base, candidate, data, lora=None) -> float:
    rep = check(adapter, candidate, base=base, thresholds=Thresholds(None, None), data=data, lora=lora)
    return rep.metrics.mean_kl


@pytest.mark.parametrize("kind", ["iq4_nl", "q4_0"])
def test_calibrated_gguf_runs_in_llama_cpp_closer_than_its_quantizer(tmp_path, fixtures, base16, kind):
    adapter, data = fixtures / "adapter-rslora-patterns", _data(tmp_path)
    out = tmp_path / f"cal-{kind}.gguf"
    report = export(adapter, "gguf", out, base=base16, gguf_type=kind, calibrate=data)
    theirs = export(adapter, "gguf", tmp_path / f"{kind}.gguf", base=base16, gguf_type=kind)
    cal = report.details["calibration"]
    assert cal["tokens"] > 50 and cal["output_error_vs_rounding"] < 1.0 and len(cal["layers"]) == 14
    reader = gguf.GGUFReader(str(out))
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert sum(t == qtype for t in types.values()) == 14  # the layers 4-bit in training
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert report.details["tensor_types"] == {
        k: sum(t.name == k for t in types.values()) for k in report.details["tensor_types"]
    }
    for t in reader.tensors:  # every tensor decodes (gguf-py) to finite values
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all(), t.name
    peer = {t.name: t for t in gguf.GGUFReader(str(tmp_path / f"{kind}.gguf")).tensors}
    for t in reader.tensors:  # the 4-bit layers take the bytes llama.cpp's quantizer gives them
        if t.tensor_type == qtype and peer[t.name].tensor_type == qtype:
            assert t.n_bytes == peer[t.name].n_bytes
    assert theirs.details["tensor_types"]
    assert _kl(adapter, base16, out, data) < _kl(adapter, base16, tmp_path / f"{kind}.gguf", data)


def test_calibrated_base_under_a_lora_gguf(tmp_path, fixtures, base16):
    """The base's codes chosen on the inputs of the fine-tuned model: base + LoRA in llama.cpp drift less than
    with llama.cpp's own IQ4_NL base."""
    adapter, data = fixtures / "adapter-qlora", _data(tmp_path)
    export(adapter, "gguf-lora", tmp_path / "cal", base=base16, gguf_type="iq4_nl", calibrate=data)
    export(adapter, "gguf-lora", tmp_path / "plain", base=base16, gguf_type="iq4_nl")
    prov = json.loads((tmp_path / "cal" / "qmerge_provenance.json").read_text())
    assert prov["calibration"]
    kl = {
        d: _kl(adapter, base16, tmp_path / d / "base-iq4_nl.gguf", data, tmp_path / d / "adapter.gguf")
        for d in ("cal", "plain")
    }
    assert kl["cal"] < kl["plain"]


def test_calibrate_needs_a_type_qmerge_encodes(tmp_path, fixtures, base16):
    data = _data(tmp_path)
    r = CliRunner().invoke(
        cli,
        ["export", str(fixtures / "adapter-qlora"), "--base", str(base16), "--to", "gguf"]
        + ["--gguf-type", "q4_k_m", "--calibrate", str(data), "-o", str(tmp_path / "x.gguf")],
    )
    assert r.exit_code == 2 and "iq4_nl or q4_0" in r.output
    assert not (tmp_path / "x.gguf").exists()
