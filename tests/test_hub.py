"""Bases named by Hub id, found offline in a Hugging Face cache built here in huggingface_hub's own layout
(models--ORG--NAME/blobs, snapshots/REVISION/FILE -> ../../blobs/SHA, refs/main), as nearly every
adapter_config.json names them; and relative bases, as TRL saves them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile import HOSTILE, assert_refused, run

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, revision: str = REVISION, main: bool = True) -> Path:
    """`src`'s files as a snapshot of `repo_id` in the cache at `cache`; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding the hostile micro model's 4-bit base as acme/micro-llama, in use."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache_repo(cache, "acme/micro-llama", HOSTILE / "clean" / "base4")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def adapter(tmp_path) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(HOSTILE / "clean" / "adapter", dst)
    return dst


def name_base(adapter: Path, named: str, revision: str | None = None) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"], cfg["revision"] = named, revision
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_merge_with_a_hub_id_base(hub, adapter, tmp_path):
    out = tmp_path / "m"
    r = run(["merge", adapter, "--base", "acme/micro-llama", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    base = json.loads((out / "qmerge_provenance.json").read_text())["inputs"]["base"]
    assert base["hub_id"] == "acme/micro-llama" and base["revision"] == REVISION


def test_the_adapters_named_hub_base_is_found(hub, adapter, tmp_path):
    name_base(adapter, "acme/micro-llama")
    assert run(["merge", adapter, "-o", tmp_path / "m"]).exit_code == 0
    info = json.loads(run(["inspect", adapter, "--json"]).stdout)
    assert not [p for p in info["problems"] if "base not inspected" in p["message"]]


def test_revisions(hub, adapter, tmp_path):
    other = "fedcba9876543210fedcba9876543210fedcba98"
    cache_repo(hub, "acme/micro-llama", HOSTILE / "clean" / "base4", revision=other, main=False)
    r = run(["merge", adapter, "--base", f"acme/micro-llama@{other}", "-o", tmp_path / "m"])
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "m" / "qmerge_provenance.json").read_text())
    assert prov["inputs"]["base"]["revision"] == other
    name_base(adapter, "acme/micro-llama", revision="1111111111111111111111111111111111111111")
    r = run(["merge", adapter, "-o", tmp_path / "m2"])
    assert_refused(
        r,
        1,
        r"adapter_config.json's base 'acme/micro-llama' at revision 1{40} is not in the Hugging Face cache",
    )


def test_a_hub_base_not_in_the_cache_says_how_to_get_it(hub, adapter, tmp_path):
    r = run(["merge", adapter, "--base", "acme/other-model", "-o", tmp_path / "m"])
    assert_refused(r, 1, r"--base 'acme/other-model' is not in the Hugging Face cache \(.*hf-cache\)")
    assert "hf download acme/other-model" in r.stderr and not (tmp_path / "m").exists()


def test_check_and_export_with_a_hub_base(hub, adapter, tmp_path):
    name_base(adapter, "acme/micro-llama")
    out = tmp_path / "m"
    assert run(["export", adapter, "--to", "nf4", "-o", out]).exit_code == 0
    r = run(["check", adapter, "--candidate", out, "--max-seqs", "1", "--seq-len", "8", "--max-kl", "1"])
    assert r.exit_code in (0, 3) and "Traceback" not in r.output, r.output


def test_a_relative_base_is_found_beside_the_adapter(tmp_path):
    """TRL writes base_model_name_or_path as given at training time: relative to where training ran. The
    hostile adapter names ../base16, found from any working directory."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copytree(HOSTILE / "clean", tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "qmerge",
        "merge",
        str(tmp_path / "run" / "adapter"),
        "-o",
        str(tmp_path / "m"),
    ]
    r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ---- the quantization training used, established -----------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MERGED_TOL = 1e-3  # fp32 merge against PEFT's unmerged forward (measured ~1e-6 on the NF4 fixtures)


@pytest.fixture(scope="module")
def fp4_trained(tmp_path_factory) -> tuple[Path, Path]:
    """A base saved as transformers' bare BitsAndBytesConfig(load_in_4bit=True) quantizes it (FP4, no double
    quant), and a PEFT adapter made on that 4-bit model, naming it as its base."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.helpers import random_adapter

    root = tmp_path_factory.mktemp("fp4")
    fp4 = root / "base-fp4"
    AutoModelForCausalLM.from_pretrained(
        str(FIXTURES / "tiny-llama-bf16"),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    ).save_pretrained(str(fp4))
    adapter = random_adapter(
        fp4, root / "adapter", seed=7, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    return fp4, adapter


def test_an_fp4_trained_adapter_is_merged_with_its_named_bases_settings(fp4_trained, tmp_path):
    """--base points at the 16-bit original; the adapter's named base (the FP4 checkpoint training used) says
    how training quantized it: the merge equals PEFT's unmerged forward on that base."""
    from tests.helpers import logits_of, reference_unmerged

    fp4, adapter = fp4_trained
    out = tmp_path / "m"
    r = run(
        ["merge", adapter, "--base", FIXTURES / "tiny-llama-bf16", "-o", out, "--dtype", "fp32", "--json"]
    )
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)["quantization"]
    assert (q["quant_type"], q["double_quant"], q["source"]) == ("fp4", False, "named base"), q
    ref = reference_unmerged(adapter, fp4)
    assert (logits_of(out) - ref).abs().max() <= MERGED_TOL
    prov = json.loads((out / "qmerge_provenance.json").read_text())
    assert prov["settings"]["base_quantization"]["source"] == "named base"


def test_without_evidence_the_assumption_is_said(fp4_trained, tmp_path):
    _fp4, adapter = fp4_trained
    lone = tmp_path / "adapter"
    shutil.copytree(adapter, lone)
    name_base(lone, "/nowhere/base-fp4")
    r = run(["merge", lone, "--base", FIXTURES / "tiny-llama-bf16", "-o", tmp_path / "m", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["quantization"]["source"] == "assumed" and report["quantization"]["quant_type"] == "nf4"
    assert any("--quant-type fp4 --no-double-quant" in w for w in report["warnings"])
    r = run(["merge", lone, "--base", FIXTURES / "tiny-llama-bf16", "-o", tmp_path / "m2"])
    assert "qmerge assumed QLoRA's NF4" in r.stderr


def test_options_that_contradict_the_named_base_win_with_a_warning(fp4_trained, tmp_path):
    _fp4, adapter = fp4_trained
    r = run(
        ["merge", adapter, "--base", FIXTURES / "tiny-llama-bf16", "-o", tmp_path / "m", "--json"]
        + ["--quant-type", "nf4"]
    )
    report = json.loads(r.stdout)
    assert report["quantization"]["source"] == "option"
    assert any(
        "differ from the adapter's named base" in w and "the options win" in w for w in report["warnings"]
    )


def test_a_4bit_base_reports_its_own_settings(tmp_path):
    r = run(
        [
            "merge",
            FIXTURES / "adapter-qlora",
            "--base",
            FIXTURES / "tiny-llama-nf4",
            "-o",
            tmp_path / "m",
            "--json",
        ]
    )
    q = json.loads(r.stdout)["quantization"]
    assert (q["quant_type"], q["blocksize"], q["double_quant"], q["source"]) == (
        "nf4",
        64,
        True,
        "checkpoint",
    )
