"""The README's main job: the demo keeps the fine-tune through the qmerge merge and GGUF q8_0; and
`qmerge check --data --generate` on the demo's outputs tells the 4-bit GGUF that loses the task apart."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qmerge.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    r = run("demo", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_demo_end_to_end(demo):
    out, result = demo
    rows = {row["name"]: row for row in result["rows"]}
    reference = rows["unmerged QLoRA (reference)"]["accuracy"]
    assert reference >= 0.9 > rows["base model (no adapter)"]["accuracy"]
    assert rows["qmerge merge (bf16)"]["accuracy"] == reference
    assert rows["GGUF q8_0 (llama.cpp)"]["accuracy"] == reference
    assert rows["qmerge merge (bf16)"]["mean_kl"] < rows["naive merge_and_unload (4-bit)"]["mean_kl"]
    assert result["check"]["passed"]
    assert (out / "model-q4_k_m.gguf").exists() and (out / "demo.json").exists()


def test_four_bit_deployments_that_keep_the_fine_tune(demo):
    """Calibrated NF4 keeps >= 90% of the unmerged model's task accuracy at the size of plain NF4 (which keeps
    none); a q4_k_m base with the adapter applied as a LoRA GGUF drifts less than the merged q4_k_m (the
    delta is not rounded; what is left is the base's own NF4 -> q4_k_m rounding)."""
    _, result = demo
    rows = {row["name"]: row for row in result["rows"]}
    reference = rows["unmerged QLoRA (reference)"]["accuracy"]
    calibrated, plain = rows["qmerge NF4 calibrated"], rows["qmerge NF4 re-export"]
    assert calibrated["accuracy"] >= 0.9 * reference > plain["accuracy"]
    assert calibrated["bytes"] == plain["bytes"]
    lora, merged = rows["GGUF q4_k_m base + LoRA GGUF"], rows["GGUF q4_k_m (llama.cpp)"]
    assert lora["accuracy"] >= merged["accuracy"] and lora["mean_kl"] < 0.75 * merged["mean_kl"]


def test_four_bit_ggufs_that_keep_the_fine_tune(demo):
    """The calibrated IQ4_XS GGUF, at most 10% larger than q4_k_m, keeps >= 95% of the task; a q4_k_m base
    (llama.cpp's own file, the 4-bit layers' blocks chosen again by qmerge) under the LoRA GGUF keeps >= 98%
    at q4_k_m's size; the merged calibrated q4_k_m with a Q8_0 token embedding (llama.cpp's rule gives it
    Q4_K) keeps >= 95% at most 10% above q4_k_m's size."""
    _, result = demo
    rows = {row["name"]: row for row in result["rows"]}
    reference = rows["unmerged QLoRA (reference)"]["accuracy"]
    calibrated, q4_k_m = rows["GGUF IQ4_XS calibrated (qmerge)"], rows["GGUF q4_k_m (llama.cpp)"]
    assert calibrated["bytes"] <= 1.1 * q4_k_m["bytes"]
    assert calibrated["accuracy"] >= 0.95 * reference > q4_k_m["accuracy"]
    lora = rows["GGUF q4_k_m calibrated base + LoRA"]
    assert lora["accuracy"] >= 0.98 * reference
    assert lora["bytes"] - rows["GGUF q4_k_m base + LoRA GGUF"]["bytes"] == 0
    merged = rows["GGUF q4_k_m calibrated, Q8_0 embedding"]
    assert merged["bytes"] <= 1.1 * q4_k_m["bytes"] and merged["accuracy"] >= 0.95 * reference


@pytest.mark.parametrize("gguf,code", [("model-q8_0.gguf", 0), ("model-q4_k_m.gguf", 3)])
def test_task_gate_on_the_demo(demo, gguf, code):
    """The gate a CI job runs: q8_0 keeps the task, q4_k_m does not (its completions differ)."""
    out, result = demo
    r = run(
        "check",
        out / "adapter",
        "--base",
        out / "base",
        "--candidate",
        out / gguf,
        "--data",
        out / "data" / "train.jsonl",
        "--generate",
        24,
        "--max-new-tokens",
        8,
        "--max-kl",
        10,
        "--min-top1",
        0,
        "--min-task-agreement",
        0.95,
        "--json",
    )
    assert r.exit_code == code, r.output
    task = json.loads(r.stdout)["task"]
    rows = {row["name"]: row for row in result["rows"]}
    name = "GGUF q8_0 (llama.cpp)" if "q8_0" in gguf else "GGUF q4_k_m (llama.cpp)"
    assert task["accuracy_candidate"] == pytest.approx(rows[name]["accuracy"])  # the demo's own figure


def test_compare_merge_bases_on_the_demo(demo):
    out, _ = demo
    r = run(
        "check",
        out / "adapter",
        "--base",
        out / "base",
        "--compare-merge-bases",
        "--data",
        out / "data" / "train.jsonl",
        "--json",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["routes"]) == {"dequantized", "original"} and rep["recommendation"] in rep["routes"]
    kl = {k: v["vs_unmerged"]["metrics"]["mean_kl"] for k, v in rep["routes"].items()}
    assert rep["recommendation"] == min(kl, key=kl.get) and rep["reason"]
