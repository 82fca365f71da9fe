"""A GGUF's general.* metadata, as llama.cpp's converter fills it with gguf-py's Metadata: the fine-tune's
name, the base's name, organization and repository from its Hub id, the license and tags of the cards, a
size label; --name; and -o DIR naming the file by llama.cpp's convention. Read back with gguf-py and
loaded by llama.cpp."""

from __future__ import annotations

import gguf
import pytest

from tests.io.test_card import BASE_CARD
from tests.test_hostile import run
from tests.test_hub import cache_repo, name_base


def fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}


@pytest.fixture
def run_dir(tmp_path, monkeypatch, base16):
    """acme/tiny-llama in a Hugging Face cache (with a card giving its license), and an adapter as a trainer
    leaves it: runs/support-bot/checkpoint-40, naming that base by Hub id."""
    import shutil

    from huggingface_hub import constants

    from tests.helpers import random_adapter

    src = tmp_path / "src"
    shutil.copytree(base16, src)
    (src / "README.md").write_text(BASE_CARD)
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "acme/tiny-llama", src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    adapter = random_adapter(
        src, tmp_path / "runs" / "support-bot" / "checkpoint-40", r=4, target_modules=["q_proj"]
    )
    name_base(adapter, "acme/tiny-llama")
    return adapter


def test_gguf_metadata_names_the_finetune_and_its_base(run_dir, tmp_path):
    out = tmp_path / "ggufs"
    out.mkdir()
    r = run(["export", run_dir, "--to", "gguf", "--gguf-type", "q8_0", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    (written,) = out.iterdir()
    meta = fields(written)
    assert meta["general.finetune"] == "support-bot" and meta["general.name"] == "Tiny Llama support-bot"
    assert written.name == f"tiny-llama-{meta['general.size_label']}-support-bot-Q8_0.gguf"
    assert meta["general.license"] == "apache-2.0" and "qmerge" in meta["general.tags"]
    assert meta["general.base_model.count"] == 1
    assert meta["general.base_model.0.organization"] == "Acme"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/acme/tiny-llama"
    from qmerge.llama_cpp import gguf_vocab_size

    assert gguf_vocab_size(written) == 320  # llama.cpp loads it


def test_name_option(run_dir, tmp_path):
    out = tmp_path / "m.gguf"
    r = run(["export", run_dir, "--to", "gguf", "-o", out, "--name", "Support Bot v2"])
    assert r.exit_code == 0, r.output
    assert fields(out)["general.name"] == "Support Bot v2"
    r = run(["export", run_dir, "--to", "fp16", "-o", tmp_path / "x", "--name", "a"])
    assert r.exit_code == 2 and "--name names the model in a GGUF's metadata" in r.output
