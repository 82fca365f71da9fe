"""Sequence-classification adapters (PEFT task_type SEQ_CLS, trained on AutoModelForSequenceClassification
over a causal LM base, the head saved whole as modules_to_save): merged into the classifier transformers
builds (its config, no language-model head, the trained head), equal to PEFT's unmerged classifier; check
measures a candidate on the class logits against PEFT's unmerged classifier."""

from __future__ import annotations

import json

import pytest
import torch

from qmerge.api import describe, export, merge
from tests.helpers import TINY_TEXT, logits_of, reference_unmerged
from tests.test_hostile import run


def _make(tmp_path, model_type: str, labels: int = 3):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY_TEXT, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=labels)
    lora = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(
        str(tmp_path / "adapter")
    )
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_seq_cls_adapter_merges_into_the_classifier(tmp_path, model_type):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    base, adapter = _make(tmp_path, model_type)
    merge(adapter, tmp_path / "merged", base, dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 3
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "score.weight" in f.keys() and "lm_head.weight" not in f.keys()
    classifier = AutoModelForSequenceClassification
    want = reference_unmerged(adapter, base, model_class=classifier, num_labels=3)
    have = logits_of(tmp_path / "merged", model_class=classifier)
    assert want.shape == (1, 3) and (want - have).abs().max() < 1e-5
    assert not [p for p in describe(adapter, base).problems if p.severity == "error"]


def test_seq_cls_exports_and_its_gguf_is_refused(tmp_path):
    base, adapter = _make(tmp_path, "llama")
    export(adapter, "nf4", tmp_path / "nf4", base=base)
    from transformers import AutoModelForSequenceClassification

    nf4 = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "nf4"), device_map="cpu")
    assert nf4.config.num_labels == 3
    r = run(["export", adapter, "--base", base, "--to", "gguf", "-o", tmp_path / "x.gguf"])
    assert r.exit_code == 1 and "convert_hf_to_gguf.py" in r.output


def test_check_streams_the_unmerged_classifier_as_peft_computes_it(tmp_path):
    """check's streamed reference for a SEQ_CLS adapter is PEFT's classifier over the NF4 base (as
    reference_unmerged builds it, bitsandbytes quantizing): its class logits at every position, the last
    one being what transformers' classifier outputs for the sequence."""
    from transformers import AutoModelForSequenceClassification

    from qmerge.pipeline.source import open_checkpoint
    from qmerge.verify.streamed import forward_logits, streamed_reference
    from tests.helpers import TOKENS

    base, adapter = _make(tmp_path, "qwen2")
    streamed = forward_logits(streamed_reference(open_checkpoint(adapter, base)), TOKENS)
    want = reference_unmerged(adapter, base, model_class=AutoModelForSequenceClassification, num_labels=3)
    assert streamed.shape == (*TOKENS.shape, 3)
    assert (streamed[:, -1] - want).abs().max() < 1e-5


def test_check_measures_a_classifier(tmp_path):
    """check on a SEQ_CLS adapter compares class logits at every position of the text: the exact merge
    passes, a merge into the 16-bit base training never saw moves the classes and fails the gate; no
    perplexity (null in the JSON); what does not apply to a classifier is refused by name."""
    base, adapter = _make(tmp_path, "llama")
    merge(adapter, tmp_path / "merged", base, dtype="fp32")
    merge(adapter, tmp_path / "original", base, dtype="fp32", merge_base="original")
    r = run(["check", adapter, "--base", base, "--candidate", tmp_path / "merged", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["max_abs_logit_diff"] < 1e-5 and m["top1_agreement"] == 1.0  # measured 3.5e-7
    assert m["ppl_reference"] is None and m["ppl_candidate"] is None and m["n_tokens"] > 100
    r = run(["check", adapter, "--base", base, "--candidate", tmp_path / "original", "--min-top1", "0.99"])
    assert r.exit_code == 3 and "class logit" in r.output  # measured top-1 0.9375
    for option in (["--against-base"], ["--naive"]):
        r = run(["check", adapter, "--base", base, "--candidate", tmp_path / "merged", *option])
        assert r.exit_code == 1 and "sequence-classification adapter" in r.output and option[0] in r.output
