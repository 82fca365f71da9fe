"""--base against the base the adapter was trained on: the adapter names it (adapter_config.json, or the
training record), and when that one is here the two are compared; another model is refused unless
--allow-other-base, a config edit of the same weights is a warning, a name that does not match an absent
named base is a warning, and the same model in another form (4-bit re-upload, another dtype) is silent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_hostile import assert_refused, run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE16 = FIXTURES / "tiny-llama-bf16"


def adapter_naming(tmp_path: Path, named: str) -> Path:
    """The QLoRA fixture adapter, naming `named` as its base (without its training record, whose base is
    the absolute path the fixtures were made at)."""
    dst = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "adapter-qlora", dst)
    (dst / "qmerge_training.json").unlink()
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = named
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def other_weights(tmp_path) -> Path:
    """The bf16 fixture base's config and tokenizer with other weights of the same shapes."""
    dst = tmp_path / "other-llama"
    shutil.copytree(BASE16, dst)
    g = torch.Generator().manual_seed(5)
    tensors = load_file(str(dst / "model.safetensors"))
    moved = {
        k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in tensors.items()
    }
    save_file(moved, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def merge(adapter: Path, base: Path, out: Path, *extra) -> object:
    return run(["merge", adapter, "--base", base, "-o", out, "--json", *extra])


def test_another_model_is_refused_unless_allowed(tmp_path, other_weights):
    adapter = adapter_naming(tmp_path, str(BASE16))
    out = tmp_path / "m"
    r = merge(adapter, other_weights, out)
    assert_refused(
        r,
        1,
        r"other-llama is another model than the base the adapter was trained on \(tiny-llama-bf16, named by "
        r"adapter_config.json\): weights of .* differ .*--allow-other-base",
    )
    assert json.loads(r.stdout)["exit_code"] == 1 and not out.exists()
    r = merge(adapter, other_weights, out, "--allow-other-base")
    assert r.exit_code == 0, r.output
    assert any("Merged anyway (--allow-other-base)" in w for w in json.loads(r.stdout)["warnings"])
    # check and export refuse likewise; inspect reports it as an error-level problem
    r = run(
        ["check", adapter, "--base", other_weights, "--candidate", out, "--max-seqs", "1", "--seq-len", "8"]
    )
    assert_refused(r, 1, r"is another model than the base the adapter was trained on")
    r = run(["export", adapter, "--base", other_weights, "--to", "fp16", "-o", tmp_path / "e"])
    assert_refused(r, 1, r"is another model than the base the adapter was trained on")
    info = json.loads(run(["inspect", adapter, "--base", other_weights, "--json"]).stdout)
    assert any(p["severity"] == "error" and "another model" in p["message"] for p in info["problems"])


def test_the_training_records_base_is_compared_too(tmp_path, other_weights):
    adapter = adapter_naming(tmp_path, "acme/not-here")
    (adapter / "qmerge_training.json").write_text(json.dumps({"base": str(other_weights.resolve())}))
    r = merge(adapter, BASE16, tmp_path / "m")
    assert_refused(r, 1, r"\(other-llama, named by qmerge_training.json\): weights of .* differ")


def test_a_config_edit_of_the_same_weights_is_a_warning(tmp_path):
    edited = tmp_path / "llama-long"
    shutil.copytree(BASE16, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    cfg["eos_token_id"] = 3
    (edited / "config.json").write_text(json.dumps(cfg))
    r = merge(adapter_naming(tmp_path, str(BASE16)), edited, tmp_path / "m")
    assert r.exit_code == 0, r.output
    (warning,) = [w for w in json.loads(r.stdout)["warnings"] if "has the weights of" in w]
    assert "config rope_parameters" in warning and "config eos_token_id: 3 vs 2" in warning


def test_the_same_model_in_another_form_passes_silently(tmp_path):
    """The NF4 fixture is the bf16 fixture quantized (norms and embeddings kept): no word about the base."""
    for named, given in ((BASE16, FIXTURES / "tiny-llama-nf4"), (FIXTURES / "tiny-llama-nf4", BASE16)):
        r = merge(adapter_naming(tmp_path / named.name, str(named)), given, tmp_path / named.name / "m")
        assert r.exit_code == 0, r.output
        assert not [w for w in json.loads(r.stdout)["warnings"] if "base" in w and "model" in w], r.stdout


def test_names_are_compared_when_the_named_base_is_not_here(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    r = merge(adapter_naming(tmp_path / "a", "meta-llama/Llama-3.1-8B"), BASE16, tmp_path / "m1")
    assert r.exit_code == 0, r.output
    assert any(
        "trained on 'meta-llama/Llama-3.1-8B'" in w and "cannot compare" in w
        for w in json.loads(r.stdout)["warnings"]
    )
    # a 4-bit re-upload's name, given its 16-bit original by name: the same model
    r = merge(adapter_naming(tmp_path / "b", "unsloth/tiny-llama-bf16-bnb-4bit"), BASE16, tmp_path / "m2")
    assert r.exit_code == 0 and not [w for w in json.loads(r.stdout)["warnings"] if "cannot compare" in w]
