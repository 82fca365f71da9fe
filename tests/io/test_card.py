"""The model card (README.md) in every model directory qmerge writes, read back with huggingface_hub's own
ModelCard parser, as the Hub reads it."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import ModelCard

from tests.test_hostile import HOSTILE, run
from tests.test_hub import cache_repo, name_base

BASE_CARD = "---\nlicense: apache-2.0\ntags:\n- llama\n---\n\n# micro-llama\n"


@pytest.fixture
def hub_base(tmp_path, monkeypatch) -> str:
    """acme/micro-llama in a Hugging Face cache, with a model card that gives its license."""
    from huggingface_hub import constants

    src = tmp_path / "src"
    shutil.copytree(HOSTILE / "clean" / "base4", src)
    (src / "README.md").write_text(BASE_CARD)
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "acme/micro-llama", src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return "acme/micro-llama"


def adapter_naming(tmp_path, named: str):
    dst = tmp_path / "adapter"
    shutil.copytree(HOSTILE / "clean" / "adapter", dst)
    name_base(dst, named)
    return dst


def test_a_merged_folder_shows_its_base_on_the_hub(tmp_path, hub_base):
    out = tmp_path / "my-finetune"
    assert run(["merge", adapter_naming(tmp_path, hub_base), "-o", out]).exit_code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == hub_base and card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert {"qmerge", "lora", "merged", "llama"} <= set(card.data.tags)
    assert "# my-finetune" in card.text and "merged into [acme/micro-llama]" in card.text
    assert str(tmp_path) not in (out / "README.md").read_text()  # no local path: it is published
    # the card is qmerge's: --force replaces the folder that holds it
    assert run(["merge", adapter_naming(tmp_path / "again", hub_base), "-o", out, "--force"]).exit_code == 0


def test_an_nf4_export_is_a_quantized_model_of_its_base(tmp_path, hub_base):
    out = tmp_path / "nf4"
    assert run(["export", adapter_naming(tmp_path, hub_base), "--to", "nf4", "-o", out]).exit_code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == hub_base and card.data.base_model_relation == "quantized"
    assert {"4-bit", "bitsandbytes"} <= set(card.data.tags) and "bitsandbytes 4-bit nf4" in card.text


def test_a_local_base_is_named_without_its_path(tmp_path):
    out = tmp_path / "m"
    shutil.copytree(HOSTILE / "clean", tmp_path / "run")
    assert run(["merge", tmp_path / "run" / "adapter", "-o", out]).exit_code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "the base `base16`" in card.text
    assert str(tmp_path) not in (out / "README.md").read_text()


def test_a_malformed_card_of_the_base_is_read_as_no_card(tmp_path):
    """The base's README.md is the user's file: YAML that does not parse gives no license, not a failure."""
    shutil.copytree(HOSTILE / "clean", tmp_path / "run")
    (tmp_path / "run" / "base16" / "README.md").write_text(
        "---\nlicense: [unclosed\n  tags: : :\n---\nbody\n"
    )
    (tmp_path / "run" / "adapter" / "README.md").write_text("---\n- a list, not a mapping\n---\n")
    out = tmp_path / "m"
    r = run(["merge", tmp_path / "run" / "adapter", "-o", out])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(out / "README.md")
    assert card.data.license is None and "qmerge" in card.data.tags


def test_a_check_report_puts_its_figures_in_the_card(tmp_path):
    """merge, check the output (--json saved), merge again with --check-report: the card shows the figures."""
    import json

    shutil.copytree(HOSTILE / "clean", tmp_path / "run")
    adapter, out = tmp_path / "run" / "adapter", tmp_path / "m"
    assert run(["merge", adapter, "-o", out]).exit_code == 0
    r = run(["check", adapter, "--candidate", out, "--json"])
    assert r.exit_code == 0, r.output
    saved = tmp_path / "check.json"
    saved.write_text(r.stdout)
    figures = json.loads(r.stdout)["metrics"]
    r = run(["merge", adapter, "-o", out, "--force", "--check-report", saved])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(out / "README.md")
    assert (
        "## Check results" in card.text and "it passed" in card.text and "`m` with the unmerged" in card.text
    )
    assert f"| top-1 token agreement | {figures['top1_agreement']:.2%} |" in card.text
    assert f"on {figures['n_tokens']} tokens of text" in card.text
    assert str(tmp_path) not in (out / "README.md").read_text()
    saved.write_text('{"output": "m", "files": []}')  # a merge report, not a check's
    r = run(["merge", adapter, "-o", tmp_path / "m2", "--check-report", saved])
    assert r.exit_code == 1 and "not a report of qmerge check" in r.output and not (tmp_path / "m2").exists()
    r = run(["export", adapter, "--to", "gguf", "-o", tmp_path / "x.gguf", "--check-report", saved])
    assert r.exit_code == 2 and "--check-report" in r.output
