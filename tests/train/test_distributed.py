"""`qmerge train` in two CPU processes (torchrun, gloo): one consistent output written by the main process,
losses on the single-process run's trajectory, resume across processes, and a result that merges and checks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


@pytest.fixture
def data(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"colour of {a}"}, {"role": "assistant", "content": b}]}
        for a, b in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
    ] * 6
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(base, data, out, processes: int, batch: int, steps: int, *extra) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "qmerge"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "--", "qmerge"]
    args = ["train", "--base", base, "--data", data, "-o", out, "--max-steps", steps, "--r", 8, "--lr", 3e-3]
    args += ["--batch-size", batch, "--grad-accum", 1, "--save-steps", 10, "--logging-steps", 5, "--seed", 1]
    args += ["--no-gradient-checkpointing", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [str(a) for a in launcher + args], capture_output=True, text=True, env=env, timeout=600
    )


def test_two_processes_train_one_adapter(tmp_path, data, base16):
    from qmerge.api import merge
    from qmerge.verify.check import check

    out = tmp_path / "ddp"
    r = _train(base16, data, out, 2, 3, 20)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "find_unused_parameters" not in r.stderr  # no unused-parameter scan warning
    objects = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1  # only the main process reports
    ddp = json.loads(r.stdout[r.stdout.index("{") :])
    assert ddp["processes"] == 2 and ddp["steps"] == 20
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    for d in (out, out / "checkpoint-10", out / "checkpoint-20"):
        assert (d / "adapter_model.safetensors").is_file() and (d / "qmerge_training.json").is_file(), d
    # the same global batch (2 x 3) in one process: the same trajectory, in expectation
    one = json.loads(_train(base16, data, tmp_path / "single", 1, 6, 20).stdout)
    assert ddp["losses"] == sorted(ddp["losses"], reverse=True) and ddp["last_loss"] < ddp["first_loss"]
    # measured: 5.592 5.269 4.996 4.801 (two processes) against 5.591 5.271 4.998 4.805 (one)
    assert len(ddp["losses"]) == len(one["losses"]) == 4
    assert all(abs(a - b) < 0.02 * b for a, b in zip(ddp["losses"], one["losses"], strict=True))
    # resume under two processes
    again = _train(base16, data, out, 2, 3, 30, "--resume", "latest")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout[again.stdout.index("{") :])["steps"] == 30
    merge(out, tmp_path / "merged", dtype="fp32")
    rep = check(out, tmp_path / "merged", device="cpu")
    assert rep.passed and rep.metrics.max_abs_logit_diff < 1e-4


def test_a_base_stored_in_bf16_by_transformers_merges(tmp_path, fixtures, base16):
    """FSDP-QLoRA runs store the 4-bit weights in bf16 (bnb_4bit_quant_storage): such a base, saved by
    transformers itself, merges and checks like any other."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qmerge.api import merge
    from tests.helpers import logits_of, reference_unmerged

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    AutoModelForCausalLM.from_pretrained(
        str(base16), quantization_config=cfg, dtype=torch.bfloat16
    ).save_pretrained(str(tmp_path / "base4-bf16"))
    merge(fixtures / "adapter-qlora", tmp_path / "m", base=tmp_path / "base4-bf16", dtype="fp32")
    ref = reference_unmerged(fixtures / "adapter-qlora", base16)
    assert (logits_of(tmp_path / "m") - ref).abs().max() <= 1e-4
