"""The quantization probe (`check --probe-quant`): an adapter trained on an FP4 base without double quant (as
transformers' bare BitsAndBytesConfig(load_in_4bit=True) loads it), its training record gone, merged under
the NF4 assumption. check alone passes that merge (its reference shares the assumption); the probe sees
that the adapter fits FP4 better, warns or fails, and agrees once the settings are given. Its losses are
PEFT's over bitsandbytes' own FP4."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.test_hostile import run

WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "fox",
    "one",
    "two",
    "three",
    "alpha",
    "beta",
    "gamma",
    "Monday",
    "March",
    "seven",
    "nine",
]


@pytest.fixture(scope="module")
def fp4_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(16-bit base, adapter trained on it in FP4 without double quant, its training data)."""
    from qmerge.demo.tiny import TinySpec, build_base
    from qmerge.train.config import load_train_config
    from qmerge.train.trainer import remove_checkpoints, train

    root = tmp_path_factory.mktemp("probe")
    base = build_base(root / "base", TinySpec(seed=11))
    rng = random.Random(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"code {i}"},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(8))},
            ]
        }
        for i in range(24)
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    adapter = root / "adapter"
    cfg = dict(base=base, data=data, output=adapter, max_steps=40, per_device_train_batch_size=8)
    cfg |= dict(gradient_accumulation_steps=1, learning_rate=1e-3, r=16, lora_alpha=32, save_steps=10_000)
    cfg |= dict(max_seq_length=64, seed=0, gradient_checkpointing=False, quant_type="fp4", double_quant=False)
    train(load_train_config(None, cfg), log=None)
    remove_checkpoints(adapter)
    (adapter / "qmerge_training.json").unlink()  # as TRL or a bare training script leaves the adapter
    return base, adapter, data


def check(adapter: Path, base: Path, candidate: Path, data: Path, *extra):
    cmd = ["check", adapter, "--base", base, "--candidate", candidate, "--data", data, "--max-seqs", "24"]
    return run([*cmd, "--json", *extra])


def test_the_probe_catches_a_wrong_assumption(fp4_run, tmp_path):
    base, adapter, data = fp4_run
    merged = tmp_path / "merged"
    assert run(["merge", adapter, "--base", base, "-o", merged, "--dtype", "fp32"]).exit_code == 0
    r = check(adapter, base, merged, data)
    assert r.exit_code == 0 and "quantization_probe" not in json.loads(r.stdout)  # check alone certifies it
    r = check(adapter, base, merged, data, "--probe-quant", "fail")
    assert r.exit_code == 3, r.output
    report = json.loads(r.stdout)
    probe = report["quantization_probe"]
    assert probe["verdict"] == "differs" and probe["best"]["quant_type"] == "fp4", probe
    assert probe["established"] == probe["settings"][0] and probe["established"]["quant_type"] == "nf4"
    assert {(s["quant_type"], s["double_quant"]) for s in probe["settings"]} == {
        ("nf4", True),
        ("nf4", False),
        ("fp4", True),
        ("fp4", False),
    }
    assert any("fits fp4 clearly better than the nf4" in f for f in report["failures"])
    report_file = tmp_path / "r.md"
    r = check(adapter, base, merged, data, "--probe-quant", "warn", "--report", report_file)
    assert r.exit_code == 0 and any("fits fp4 clearly better" in w for w in json.loads(r.stdout)["warnings"])
    assert "quantization probe" in report_file.read_text()


def test_the_probe_agrees_with_the_right_settings(fp4_run, tmp_path):
    base, adapter, data = fp4_run
    merged = tmp_path / "merged"
    given = ["--quant-type", "fp4", "--no-double-quant"]
    assert run(["merge", adapter, "--base", base, "-o", merged, *given]).exit_code == 0
    r = check(adapter, base, merged, data, "--probe-quant", "fail", *given)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["quantization_probe"]["verdict"] == "agrees"


def test_the_probes_losses_are_peft_over_bitsandbytes(fp4_run):
    """The probe's FP4 / no double quant / bf16 loss equals PEFT's unmerged model on the base bitsandbytes
    quantized (and dequantized) itself, on the same scored tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmerge.pipeline.base import QuantSettings
    from qmerge.pipeline.model import load_tokenizer
    from qmerge.pipeline.source import open_checkpoint
    from qmerge.verify.probe import probe_quantization
    from qmerge.verify.runner import chunks
    from qmerge.verify.tokens import data_batch

    base, adapter, data = fp4_run
    source = open_checkpoint(adapter, base, QuantSettings())
    batch = data_batch(load_tokenizer(adapter, base), data, 64, 24)
    probe = probe_quantization(source, chunks(batch, 320))
    (ours,) = [
        s["loss"]
        for s in probe.settings
        if (s["quant_type"], s["double_quant"], s["dtype"]) == ("fp4", False, "bfloat16")
    ]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)  # FP4, no DQ
    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=bnb, device_map="cpu")
    model = PeftModel.from_pretrained(model.dequantize().float(), str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.tokens).logits.double()
    known = batch.scored & (batch.targets >= 0)
    nll = torch.nn.functional.cross_entropy(logits[known], batch.targets[known])
    assert abs(float(nll) - ours) < 1e-4, (float(nll), ours)


def test_a_4bit_base_needs_no_probe(tmp_path, fixtures):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "one two", "completion": " three four five"}) + "\n")
    adapter, base = fixtures / "adapter-qlora", fixtures / "tiny-llama-nf4"
    merged = tmp_path / "m"
    assert run(["merge", adapter, "--base", base, "-o", merged]).exit_code == 0
    r = check(adapter, base, merged, data, "--probe-quant", "fail")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["quantization_probe"]["verdict"] == "known"


def test_the_probe_needs_data(fixtures, tmp_path):
    r = run(["check", fixtures / "adapter-qlora", "--candidate", tmp_path, "--probe-quant", "warn"])
    assert r.exit_code == 2 and "--probe-quant needs --data" in r.output
