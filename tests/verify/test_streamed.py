"""Streamed models (one module's weights at a time) against the same models held whole by transformers,
bitsandbytes and PEFT: the logits agree to STREAM_TOL on every architecture merge supports, from 4-bit and
16-bit bases, with DoRA, rsLoRA, rank/alpha patterns, modules_to_save, LoRA on embeddings and tied
embeddings; candidates (merged directories, NF4 exports) too."""

from __future__ import annotations

import pytest
import torch

from qmerge.api import export, merge
from qmerge.pipeline.model import streamed_model
from qmerge.pipeline.source import open_checkpoint, open_source
from qmerge.verify.streamed import logits, streamed_reference
from tests.helpers import TOKENS, bnb_config, logits_of, random_adapter, reference_unmerged
from tests.test_architectures import ARCHS, make_base_and_adapter

# The same transformers modules on the same fp32 weights: only the order of float operations may differ
# (none does today: the measured difference is 0).
STREAM_TOL = 1e-6


def _reference_matches(adapter, base, original: bool = False) -> None:
    source = open_checkpoint(adapter, base, merge_base="original" if original else "dequantized")
    got = logits(streamed_reference(source), TOKENS)
    assert (got - reference_unmerged(adapter, base, original=original)).abs().max() <= STREAM_TOL


@pytest.mark.parametrize("adapter", ["adapter-qlora", "adapter-rslora-patterns", "adapter-dora"])
@pytest.mark.parametrize("base", ["tiny-llama-bf16", "tiny-llama-nf4"])
def test_reference_on_the_fixtures(fixtures, adapter, base):
    _reference_matches(fixtures / adapter, fixtures / base)


def test_reference_on_the_original_base(fixtures, base16):
    _reference_matches(fixtures / "adapter-qlora", base16, original=True)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_reference_and_merged_candidate_on_every_architecture(tmp_path, model_type):
    base, adapter = make_base_and_adapter(tmp_path, model_type)
    _reference_matches(adapter, base)
    merge(adapter, tmp_path / "m", base=base, dtype="bf16")
    got = logits(streamed_model(open_source(tmp_path / "m")), TOKENS)
    assert (got - logits_of(tmp_path / "m")).abs().max() <= STREAM_TOL


def test_nf4_candidate(tmp_path, fixtures, base16):
    from transformers import AutoModelForCausalLM

    export(fixtures / "adapter-qlora", "nf4", tmp_path / "nf4", base=base16)
    whole = (
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"), device_map="cpu")
        .dequantize()
        .float()
        .eval()
    )
    with torch.no_grad():
        want = whole(input_ids=TOKENS).logits
    got = logits(streamed_model(open_source(tmp_path / "nf4")), TOKENS)
    assert (got - want).abs().max() <= STREAM_TOL


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),  # a tied weight trained as a copy
        dict(target_modules=["q_proj", "lm_head"]),  # LoRA on a tied output layer
        dict(target_modules=["embed_tokens", "q_proj"]),  # LoRA on embeddings (the base layer saved)
        dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
    ],
)
def test_reference_tied_embeddings_and_embedding_lora(tmp_path, lora):
    from qmerge.demo.tiny import TinySpec, build_base

    base = build_base(tmp_path / "base", TinySpec(arch="qwen2", tie_word_embeddings=True))
    adapter = random_adapter(base, tmp_path / "adapter", seed=3, r=4, lora_alpha=8, **lora)
    _reference_matches(adapter, base)


def test_gpt2_conv1d_from_a_4bit_base(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=320, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=bnb_config(torch.bfloat16), device_map="cpu"
    ).save_pretrained(str(tmp_path / "base4"))
    adapter = random_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    for base in ("base", "base4"):
        _reference_matches(adapter, tmp_path / base)


@pytest.mark.parametrize(
    "budget", [None, 1]
)  # one chunk held in memory; one sequence a chunk, spilled to disk
def test_check_metrics_equal_whole_model_metrics(tmp_path, fixtures, base16, monkeypatch, budget):
    """`check` (streamed, chunked) gives the metrics of the whole-model computation on the same tokens."""
    import dataclasses

    import qmerge.verify.check as chk
    from qmerge.pipeline.model import load_tokenizer
    from qmerge.verify.metrics import Thresholds, compare_logits
    from qmerge.verify.tokens import make_tokens

    adapter = fixtures / "adapter-dora"
    merge(adapter, tmp_path / "m", base=base16, dtype="bf16")
    if budget:
        import qmerge.verify.runner as runner

        monkeypatch.setattr(runner, "LOGITS_BUDGET", budget)
    got = chk.check(
        adapter, tmp_path / "m", base=base16, thresholds=Thresholds(None, None, None), device="cpu"
    )
    tokens = make_tokens(load_tokenizer(adapter, base16), 320, None, 128, 8)
    want = compare_logits(
        reference_unmerged(adapter, base16, tokens), logits_of(tmp_path / "m", tokens), tokens
    )
    for key, value in dataclasses.asdict(want).items():
        assert getattr(got.metrics, key) == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_on_cuda_runs_the_reference_as_training_ran(tmp_path, fixtures, base16):
    from qmerge.verify.check import check
    from qmerge.verify.metrics import Thresholds

    merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16, dtype="bf16")
    cpu = check(
        fixtures / "adapter-qlora",
        tmp_path / "m",
        base=base16,
        thresholds=Thresholds(None, None, None),
        device="cpu",
    )
    gpu = check(
        fixtures / "adapter-qlora",
        tmp_path / "m",
        base=base16,
        thresholds=Thresholds(None, None, None),
        device="cuda",
        fp32_reference=True,
    )
    assert gpu.metrics.top1_agreement == pytest.approx(cpu.metrics.top1_agreement, abs=0.02)
    bf16 = check(fixtures / "adapter-qlora", tmp_path / "m", base=base16, device="cuda")
    assert bf16.metrics.n_tokens == cpu.metrics.n_tokens and bf16.metrics.top1_agreement > 0.9
