"""Modelfiles qmerge writes: `--to gguf-lora` (in its directory) and `--to gguf --modelfile PATH`: FROM and
ADAPTER paths Ollama resolves, the TEMPLATE that renders sample conversations as the tokenizer's own chat
template (Go's text/template as the reference where installed), stop strings, a template it cannot
translate said in the file and the JSON, and the output rules (a user's file is never replaced)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from qmerge.api import export
from qmerge.chat.ollama import ollama_prompt
from qmerge.chat.translate import SAMPLES
from qmerge.cli import cli
from qmerge.pipeline.model import load_tokenizer
from tests.chat.conftest import ollama_case

pytest.importorskip("llama_cpp")


def _template(modelfile) -> str | None:
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile.read_text(encoding="utf-8"), re.S | re.M)
    return m.group(1) if m else None


def _adapter(tmp_path, fixtures):
    adapter = tmp_path / "adapter"
    shutil.copytree(fixtures / "adapter-qlora", adapter)
    (adapter / "qmerge_training.json").unlink(missing_ok=True)
    return adapter


def test_gguf_lora_modelfile_chats_as_the_model_was_trained(tmp_path, fixtures, base16, go_render):
    report = export(_adapter(tmp_path, fixtures), "gguf-lora", tmp_path / "out", base=base16, gguf_type="f32")
    modelfile = tmp_path / "out" / "Modelfile"
    text = modelfile.read_text(encoding="utf-8")
    assert "FROM ./base-f32.gguf\nADAPTER ./adapter.gguf\n" in text
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|user|>"' in text
    assert report.details["modelfile"]["translated"] is True
    template = _template(modelfile)
    tokenizer = load_tokenizer(base16)
    want = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in SAMPLES]
    assert [ollama_prompt(template, c) for c in SAMPLES] == want
    assert [g["out"] for g in go_render([ollama_case(template, c) for c in SAMPLES])] == want


def test_lora_gguf_carries_the_general_metadata(tmp_path, fixtures, base16):
    import gguf

    export(_adapter(tmp_path, fixtures), "gguf-lora", tmp_path / "out", base=base16, gguf_type="f32")
    fields = gguf.GGUFReader(str(tmp_path / "out" / "adapter.gguf")).fields
    name = fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() and "general.finetune" in fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_modelfile_option_for_gguf(tmp_path, fixtures, base16):
    adapter = _adapter(tmp_path, fixtures)
    args = ["export", adapter, "--base", base16, "--to", "gguf", "--gguf-type", "f32"]
    r = _run(*args, "-o", tmp_path / "m.gguf", "--modelfile", tmp_path / "Modelfile", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["modelfile"]["translated"] and report["modelfile"]["family"] == "phi3"
    assert str(tmp_path / "Modelfile") in {f["path"] for f in report["files"]}
    assert "FROM ./m.gguf\n" in (tmp_path / "Modelfile").read_text()
    (tmp_path / "elsewhere").mkdir()
    r = _run(*args, "-o", tmp_path / "m.gguf", "--modelfile", tmp_path / "elsewhere" / "Modelfile", "--force")
    assert r.exit_code == 0, r.output
    assert f"FROM {tmp_path / 'm.gguf'}\n" in (tmp_path / "elsewhere" / "Modelfile").read_text()
    r = _run(*args, "-o", tmp_path / "m.gguf", "--modelfile", tmp_path / "Modelfile", "--force")
    assert r.exit_code == 0, r.output  # --force replaces a Modelfile qmerge wrote


def test_modelfile_output_rules(tmp_path, fixtures, base16):
    adapter = _adapter(tmp_path, fixtures)
    args = ["export", adapter, "--base", base16, "--to", "gguf", "--gguf-type", "f32"]
    mine = tmp_path / "Modelfile"
    mine.write_text("FROM llama3\nSYSTEM my own\n")
    r = _run(*args, "-o", tmp_path / "m.gguf", "--modelfile", mine, "--force")
    assert r.exit_code == 1 and "qmerge" in r.output and not (tmp_path / "m.gguf").exists()
    assert mine.read_text() == "FROM llama3\nSYSTEM my own\n"
    r = _run(*args, "-o", tmp_path / "m.gguf", "--modelfile", tmp_path / "m.gguf")
    assert r.exit_code == 1 and "its own path" in r.output
    r = _run("export", adapter, "--base", base16, "--to", "bf16", "-o", tmp_path / "d", "--modelfile", mine)
    assert r.exit_code == 2 and "--modelfile" in r.output


def test_a_template_it_cannot_translate_is_said(tmp_path, fixtures):
    adapter = _adapter(tmp_path, fixtures)  # its own tokenizer: the one the GGUF carries
    numbered = "{% for m in messages %}{{ loop.index|string + m['role'] + m['content'] }}{% endfor %}"
    (adapter / "chat_template.jinja").write_text(numbered)
    cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (adapter / "tokenizer_config.json").write_text(json.dumps(cfg))
    report = export(
        adapter, "gguf-lora", tmp_path / "out", base=fixtures / "tiny-llama-bf16", gguf_type="f32"
    )
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "TEMPLATE" not in text.replace("write TEMPLATE yourself", "") and "not translated" in text
    assert report.details["modelfile"]["translated"] is False
    assert any("no TEMPLATE" in w for w in report.warnings)
