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


def test_calibrated_iq4_xs_super_blocks(tmp_path):
    """IQ4_XS on rows of whole 256-weight super-blocks (a model built here with hidden 256), IQ4_NL for the
    others as llama.cpp falls back; llama.cpp runs it closer to the unmerged model than its own IQ4_XS."""
    from qmerge.demo.tiny import TinySpec, build_base
    from tests.helpers import random_adapter

    base = build_base(tmp_path / "base", TinySpec(hidden_size=256, intermediate_size=320))
    adapter = random_adapter(
        base, tmp_path / "adapter", seed=3, r=8, lora_alpha=16, target_modules="all-linear"
    )
    data = _data(tmp_path)
    report = export(adapter, "gguf", tmp_path / "cal.gguf", base=base, gguf_type="iq4_xs", calibrate=data)
    export(adapter, "gguf", tmp_path / "theirs.gguf", base=base, gguf_type="iq4_xs")
    assert report.details["tensor_types"]["IQ4_XS"] == 12  # down_proj's 320 inputs: IQ4_NL
    assert report.details["tensor_types"]["IQ4_NL"] == 2
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    for t in gguf.GGUFReader(str(tmp_path / "cal.gguf")).tensors:
        if t.tensor_type.name.startswith("IQ4") and theirs[t.name].tensor_type == t.tensor_type:
            assert t.n_bytes == theirs[t.name].n_bytes
    assert _kl(adapter, base, tmp_path / "cal.gguf", data) < _kl(
        adapter, base, tmp_path / "theirs.gguf", data
    )


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model with hidden 256 (rows of whole 256-weight super-blocks except down_proj's 320 inputs) and an
    rsLoRA adapter with rank/alpha patterns."""
    from qmerge.demo.tiny import TinySpec, build_base
    from tests.helpers import random_adapter

    root = tmp_path_factory.mktemp("wide")
    base = build_base(root / "base", TinySpec(hidden_size=256, intermediate_size=320))
    adapter = random_adapter(
        base,
        root / "adapter",
        seed=4,
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        use_rslora=True,
        rank_pattern={"o_proj": 4},
        alpha_pattern={"v_proj": 32},
    )
    return base, adapter


@pytest.mark.parametrize("kind", ["q4_k_m", "q3_k_m"])
def test_calibrated_k_quants_are_llama_cpps_file_with_better_blocks(tmp_path, wide, kind):
    """llama.cpp's own file (same tensors, types, offsets, size); the blocks of the layers 4-bit in training
    chosen again (Q4_K/Q5_K/Q6_K by qmerge's GPTQ, Q3_K and the Q5_0 fallback of down_proj's 320 columns by
    llama.cpp's quantizer with the importance matrix), every other tensor byte for byte llama.cpp's;
    llama.cpp runs it closer to the unmerged model than its own file of that type."""
    base, adapter = wide
    data = _data(tmp_path)
    report = export(adapter, "gguf", tmp_path / "cal.gguf", base=base, gguf_type=kind, calibrate=data)
    export(adapter, "gguf", tmp_path / "theirs.gguf", base=base, gguf_type=kind)
    assert (tmp_path / "cal.gguf").stat().st_size == (tmp_path / "theirs.gguf").stat().st_size
    cal = report.details["calibration"]
    assert cal["output_error_vs_rounding"] < 0.9
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    changed = {}
    for t in gguf.GGUFReader(str(tmp_path / "cal.gguf")).tensors:
        peer = theirs[t.name]
        assert (t.tensor_type, t.data_offset) == (peer.tensor_type, peer.data_offset)
        if not np.array_equal(t.data, peer.data):
            changed[t.name] = t.tensor_type.name
            assert t.name.startswith("blk.") and t.tensor_type.name in (
                "Q3_K",
                "Q4_K",
                "Q5_K",
                "Q6_K",
                "Q5_0",
            )
    assert len(changed) == cal["tensors"] >= 12
    if kind == "q3_k_m":
        assert "Q3_K" in changed.values()
    assert _kl(adapter, base, tmp_path / "cal.gguf", data) < _kl(
        adapter, base, tmp_path / "theirs.gguf", data
    )


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("phi3", False), ("gemma2", True)])
def test_calibrated_q4_k_m_on_other_architectures(tmp_path, arch, tied):
    """Biases and tied embeddings (qwen2), fused qkv / gate_up (phi3), Gemma's norms and soft-capping: every
    layer 4-bit in training calibrated, llama.cpp runs it closer to the unmerged model than its own q4_k_m.
    Measured over all eight architectures of test_gguf (hidden 256): KL 3-11x lower."""
    from qmerge.demo.tiny import TinySpec, build_base
    from tests.helpers import random_adapter

    spec = TinySpec(
        arch=arch, tie_word_embeddings=tied, num_key_value_heads=2, hidden_size=256, intermediate_size=512
    )
    base = build_base(tmp_path / "base", spec)
    adapter = random_adapter(
        base, tmp_path / "adapter", seed=7, r=8, lora_alpha=16, target_modules="all-linear"
    )
    data = _data(tmp_path)
    report = export(adapter, "gguf", tmp_path / "cal.gguf", base=base, gguf_type="q4_k_m", calibrate=data)
    export(adapter, "gguf", tmp_path / "theirs.gguf", base=base, gguf_type="q4_k_m")
    assert report.details["calibration"]["tensors"] == (8 if arch == "phi3" else 14)
    assert _kl(adapter, base, tmp_path / "cal.gguf", data) < 0.5 * _kl(
        adapter, base, tmp_path / "theirs.gguf", data
    )


def test_keep_delta_puts_the_layers_that_lose_their_delta_at_q8_0(tmp_path, wide):
    """--keep-delta X: the layers whose calibrated delta retention is below X rewritten at Q8_0 (retention near
    1 after), every other tensor and the metadata byte for byte the calibrated file's; the bytes added are
    reported; llama.cpp runs it closer to the unmerged model."""
    base, adapter = wide
    data = _data(tmp_path)
    a = export(adapter, "gguf", tmp_path / "a.gguf", base=base, gguf_type="q4_k_m", calibrate=data)
    layers = a.details["delta_retention"]["layers"]
    threshold = sorted(r["kept"] for r in layers.values())[len(layers) // 2]  # about half of them
    b = export(
        adapter,
        "gguf",
        tmp_path / "b.gguf",
        base=base,
        gguf_type="q4_k_m",
        calibrate=data,
        keep_delta=threshold,
    )
    kept = b.details["keep_delta"]
    assert set(kept["layers"]) == {n for n, r in layers.items() if r["kept"] < threshold} != set()
    for r in kept["layers"].values():
        assert r["type"] == "Q8_0" and r["kept_after"] > max(r["kept_before"], 0.99)
    size = {p: (tmp_path / p).stat().st_size for p in ("a.gguf", "b.gguf")}
    assert kept["bytes_added"] == size["b.gguf"] - size["a.gguf"] > 0
    assert b.files[0].sha256 != a.files[0].sha256 and b.files[0].bytes == size["b.gguf"]
    ra, rb = gguf.GGUFReader(str(tmp_path / "a.gguf")), gguf.GGUFReader(str(tmp_path / "b.gguf"))
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}  # noqa: E731
    assert fields(ra) == fields(rb)
    old = {t.name: t for t in ra.tensors}
    upgraded = {t.name for t in rb.tensors if t.tensor_type != old[t.name].tensor_type}
    assert len(upgraded) == len(kept["layers"])
    for t in rb.tensors:
        if t.name in upgraded:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else:
            assert np.array_equal(t.data, old[t.name].data), t.name
    assert _kl(adapter, base, tmp_path / "b.gguf", data) < _kl(adapter, base, tmp_path / "a.gguf", data)


def test_keep_delta_needs_a_calibrated_gguf(tmp_path, fixtures, base16):
    r = CliRunner().invoke(
        cli,
        ["export", str(fixtures / "adapter-qlora"), "--base", str(base16), "--to", "gguf"]
        + ["--gguf-type", "q4_k_m", "--keep-delta", "0.5", "-o", str(tmp_path / "x.gguf")],
    )
    assert r.exit_code == 2 and "--calibrate" in r.output and not (tmp_path / "x.gguf").exists()


def test_calibrated_q4_k_m_base_under_a_lora_gguf(tmp_path, wide):
    """gguf-lora on a calibrated q4_k_m base: closer to PEFT's unmerged model in llama.cpp than the same
    adapter on llama.cpp's own q4_k_m base of the weights training saw."""
    base, adapter = wide
    data = _data(tmp_path)
    export(adapter, "gguf-lora", tmp_path / "cal", base=base, gguf_type="q4_k_m", calibrate=data)
    export(adapter, "gguf-lora", tmp_path / "plain", base=base, gguf_type="q4_k_m")
    kl = {
        d: _kl(adapter, base, tmp_path / d / "base-q4_k_m.gguf", data, tmp_path / d / "adapter.gguf")
        for d in ("cal", "plain")
    }
    assert kl["cal"] < kl["plain"]


def test_calibrated_k_quant_with_nothing_to_calibrate(tmp_path, fixtures, base16):
    """The fixture's rows of 64 weights: llama.cpp's q6_k gives no layer a type that takes importance (K-quants
    need 256-weight rows; Q6_K falls back to Q8_0 here), so there is nothing to calibrate: one message."""
    r = CliRunner().invoke(
        cli,
        ["export", str(fixtures / "adapter-qlora"), "--base", str(base16), "--to", "gguf"]
        + ["--gguf-type", "q6_k", "--calibrate", str(_data(tmp_path)), "-o", str(tmp_path / "x.gguf")],
    )
    message = r.output.replace("\n", "")
    assert r.exit_code == 1 and "256-weight super-blocks" in message and "Traceback" not in message
    assert not (tmp_path / "x.gguf").exists()


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
        + ["--gguf-type", "q8_0", "--calibrate", str(data), "-o", str(tmp_path / "x.gguf")],
    )
    assert r.exit_code == 2 and "q4_k_m" in r.output and "q8_0" not in r.output.split("--gguf-type")[-1]
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_is_the_mean_square_input_transformers_sees(tmp_path, fixtures, base16):
    """--imatrix: llama.cpp's imatrix GGUF whose in_sum2 / counts equal each Linear's summed squared inputs
    over the calibration tokens, measured with forward hooks on the merged model loaded by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qmerge.formats.calibration import calibration_tokens

    adapter, data = fixtures / "adapter-qlora", _data(tmp_path)
    out, mat = tmp_path / "m.gguf", tmp_path / "m.imatrix.gguf"
    report = export(adapter, "gguf", out, base=base16, gguf_type="iq4_nl", calibrate=data, imatrix=mat)
    assert [f.path for f in report.files] == ["m.gguf", "m.imatrix.gguf"]
    export(adapter, "fp32", tmp_path / "merged", base=base16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    tokens, mask = calibration_tokens(data, AutoTokenizer.from_pretrained(str(base16)), 8192)
    sums = {}

    def hook(name):
        return lambda m, args: sums.__setitem__(name, (args[0][mask].double() ** 2).sum(0))

    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers." in n:
            m.register_forward_pre_hook(hook(n))
    with torch.no_grad():
        model(input_ids=tokens, attention_mask=mask.long())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    reader = gguf.GGUFReader(str(mat))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix" and fields["imatrix.chunk_size"] == 512
    stored = {t.name: t.data.ravel() for t in reader.tensors}
    assert len(stored) == 2 * len(sums) == 28
    for hf, expected in sums.items():
        name = names.get_name(hf + ".weight", try_suffixes=(".weight",))
        assert stored[name + ".counts"][0] == int(mask.sum())
        np.testing.assert_allclose(stored[name + ".in_sum2"], expected.numpy(), rtol=2e-3)


def test_imatrix_needs_a_calibrated_gguf(tmp_path, fixtures, base16):
    r = CliRunner().invoke(
        cli,
        ["export", str(fixtures / "adapter-qlora"), "--base", str(base16), "--to", "gguf"]
        + ["--gguf-type", "q8_0", "--imatrix", str(tmp_path / "i.gguf"), "-o", str(tmp_path / "x.gguf")],
    )
    assert r.exit_code == 2 and "--calibrate" in r.output


@pytest.mark.parametrize(
    "name,content",
    [("bad.txt", b"\xff\xfe bad"), ("empty.jsonl", b""), ("weird.jsonl", b'{"foo": 1}\n'), ("one.txt", b"a")],
)
def test_bad_calibration_data_is_one_message(tmp_path, fixtures, base16, name, content):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(
        cli,
        ["export", str(fixtures / "adapter-qlora"), "--base", str(base16), "--to", "gguf"]
        + ["--gguf-type", "iq4_nl", "--calibrate", str(data), "-o", str(out)],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output and str(data) in r.output.replace("\n", "")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [name]
