"""qmerge train on CPU: the loss falls, the checkpoint round-trips through inspect, merge and check."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from qmerge.data import IGNORE, encode_record
from qmerge.errors import InputError
from qmerge.train.config import TrainConfig, load_train_config
from qmerge.train.trainer import train


@pytest.fixture
def data(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"colour of {a}"}, {"role": "assistant", "content": b}]}
        for a, b in [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
    ] * 4
    rows += [{"instruction": "name a day", "output": "Monday"}, {"text": "one two three four"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_loss_falls_and_checkpoint_round_trips(tmp_path, data, base16):
    from qmerge.api import merge
    from qmerge.verify.check import check
    from tests.helpers import inspect_path

    cfg = load_train_config(
        None,
        dict(
            base=base16,
            data=data,
            output=tmp_path / "run",
            max_steps=30,
            r=8,
            lora_alpha=16,
            learning_rate=3e-3,
            per_device_train_batch_size=6,
            gradient_accumulation_steps=1,
            logging_steps=5,
            save_steps=15,
            eval_data=data,
            gradient_checkpointing=True,
        ),
    )
    result = train(cfg, log=None)
    assert result["last_loss"] < result["first_loss"] and result["eval_loss"] is not None
    assert result["optimizer"] == ("paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch")
    ckpt = tmp_path / "run" / "checkpoint-30"
    assert (ckpt / "qmerge_training.json").exists()
    info = inspect_path(ckpt)
    assert info["adapter"]["r"] == 8 and info["problems"] == [] and info["num_parameters"]
    merge(ckpt, tmp_path / "merged", dtype="fp32")  # base found from the adapter's own record
    rep = check(ckpt, tmp_path / "merged")
    assert rep.passed and rep.metrics.max_abs_logit_diff < 1e-4


def test_resume_from_latest(tmp_path, data, base16):
    common = dict(
        base=base16,
        data=data,
        output=tmp_path / "run",
        r=4,
        learning_rate=1e-3,
        per_device_train_batch_size=6,
        gradient_accumulation_steps=1,
        save_steps=5,
        gradient_checkpointing=False,
    )
    train(load_train_config(None, {**common, "max_steps": 5}), log=None)
    result = train(
        load_train_config(None, {**common, "max_steps": 10, "resume_from_checkpoint": "latest"}), log=None
    )
    assert result["steps"] == 10


def test_loss_only_on_responses(base16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base16))
    ex = encode_record(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "blue sky"}]},
        tok,
        64,
        "x",
    )
    learned = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE])
    assert learned.startswith("blue sky") and "hi" not in learned
    ex = encode_record({"instruction": "say", "output": "green"}, tok, 64, "x")
    assert tok.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    ).startswith("green")


def test_config_file_and_overrides(tmp_path, base16, data):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump({"base": str(base16), "data": str(data), "output": str(tmp_path / "o"), "r": 32})
    )
    cfg = load_train_config(f, {"r": 16})
    assert isinstance(cfg, TrainConfig) and cfg.r == 16 and cfg.lora_alpha == 16 and cfg.learning_rate == 2e-4
    with pytest.raises(InputError, match="unknown training option"):
        load_train_config(f, {"rank": 3})


def test_bad_data_names_the_line(tmp_path, base16):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        train(load_train_config(None, dict(base=base16, data=bad, output=tmp_path / "o")), log=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need CUDA")
def test_paged_optimizer_on_cuda(tmp_path, data, base16):
    cfg = load_train_config(
        None,
        dict(
            base=base16,
            data=data,
            output=tmp_path / "run",
            max_steps=10,
            r=8,
            learning_rate=3e-3,
            per_device_train_batch_size=6,
            gradient_accumulation_steps=1,
        ),
    )
    result = train(cfg, log=None)
    assert result["optimizer"] == "paged_adamw_32bit" and result["compute_dtype"] == "bfloat16"
    assert result["last_loss"] < result["first_loss"]
