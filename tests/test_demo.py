"""The README's main job: the demo keeps the fine-tune through the qmerge merge and GGUF q8_0."""

from __future__ import annotations

import json

from click.testing import CliRunner

from qmerge.cli import cli


def test_demo_end_to_end(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "demo"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = {row["name"]: row for row in result["rows"]}
    reference = rows["unmerged QLoRA (reference)"]["accuracy"]
    assert reference >= 0.9 > rows["base model (no adapter)"]["accuracy"]
    assert rows["qmerge merge (bf16)"]["accuracy"] == reference
    assert rows["GGUF q8_0 (llama.cpp)"]["accuracy"] == reference
    assert rows["qmerge merge (bf16)"]["mean_kl"] < rows["naive merge_and_unload (4-bit)"]["mean_kl"]
    assert result["check"]["passed"]
    assert (tmp_path / "demo" / "model-q4_k_m.gguf").exists() and (tmp_path / "demo" / "demo.json").exists()
