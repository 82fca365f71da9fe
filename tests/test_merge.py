"""Merges against PEFT's unmerged forward (tolerances from the merge issue), and output guarantees."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmerge.api import check, merge
from qmerge.errors import InputError, MismatchError, OutputError
from tests.helpers import TOKENS, bnb_config, kl_top1, logits_of, random_adapter, reference_unmerged

# fp32 merge vs fp32 unmerged: only float summation order differs (B@A once vs per token).
FP32_TOL = 1e-4
ADAPTERS = ["adapter-qlora", "adapter-rslora-patterns", "adapter-dora"]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_fp32_merge_equals_unmerged(tmp_path, fixtures, base16, adapter):
    out = tmp_path / "m"
    merge(fixtures / adapter, out, base=base16, dtype="fp32")
    diff = (logits_of(out) - reference_unmerged(fixtures / adapter, base16)).abs().max()
    assert diff <= FP32_TOL


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_bf16_merge_keeps_top1_and_kl(tmp_path, fixtures, base16, adapter):
    out = tmp_path / "m"
    merge(fixtures / adapter, out, base=base16, dtype="bf16")
    kl, top1 = kl_top1(reference_unmerged(fixtures / adapter, base16), logits_of(out))
    assert top1 >= 0.99 and kl <= 1e-3


def test_4bit_base_gives_the_same_merge_as_16bit_base(tmp_path, fixtures, base16, base4):
    """Reproducing NF4 from the 16-bit base is bit-exact with reading transformers' 4-bit checkpoint."""
    merge(fixtures / "adapter-qlora", tmp_path / "a", base=base16, dtype="fp32")
    merge(fixtures / "adapter-qlora", tmp_path / "b", base=base4, dtype="fp32")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_base_original_matches_peft_on_16bit(tmp_path, fixtures, base16):
    merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16, dtype="fp32", merge_base="original")
    ref = reference_unmerged(fixtures / "adapter-qlora", base16, original=True)
    assert (logits_of(tmp_path / "m") - ref).abs().max() <= FP32_TOL


def test_sharded_output_loads_and_matches(tmp_path, fixtures, base16):
    out = tmp_path / "m"
    report = merge(fixtures / "adapter-dora", out, base=base16, dtype="fp32", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {f.path for f in report.files} >= set(index["weight_map"].values())
    assert (logits_of(out) - reference_unmerged(fixtures / "adapter-dora", base16)).abs().max() <= FP32_TOL


def test_output_directory_contents(tmp_path, fixtures, base16):
    out = tmp_path / "m"
    report = merge(fixtures / "adapter-qlora", out, base=base16)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "qmerge_provenance.json"):
        assert (out / f).exists(), f
    prov = json.loads((out / "qmerge_provenance.json").read_text())
    assert prov["settings"]["merge_base"] == "dequantized" and prov["inputs"]["adapter"]["files"]
    assert report.num_tensors_merged == 14
    import hashlib

    for f in report.files:
        assert hashlib.sha256((out / f.path).read_bytes()).hexdigest() == f.sha256


def test_embedding_lora_and_lora_bias(tmp_path, base16):
    """LoRA on embeddings (with the saved base layer) and LoRA biases, against PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_pretrained(str(base16), dtype=torch.float32)
    p = get_peft_model(
        m, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    p.save_pretrained(str(tmp_path / "emb"))
    merge(tmp_path / "emb", tmp_path / "m1", base=base16, dtype="fp32")
    assert (logits_of(tmp_path / "m1") - reference_unmerged(tmp_path / "emb", base16)).abs().max() <= FP32_TOL
    # LoRA bias needs a base layer with a bias: a tiny Qwen2 (q/k/v biases)
    from qmerge.demo.tiny import TinySpec, build_base

    qbase = build_base(tmp_path / "qwen", TinySpec(arch="qwen2"))
    torch.manual_seed(4)
    q = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(qbase), dtype=torch.float32),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for n, prm in q.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                prm.normal_(0, 0.1)
    q.save_pretrained(str(tmp_path / "bias"))
    merge(tmp_path / "bias", tmp_path / "m2", base=qbase, dtype="fp32")
    assert (logits_of(tmp_path / "m2") - reference_unmerged(tmp_path / "bias", qbase)).abs().max() <= FP32_TOL
    del Qwen2Config, Qwen2ForCausalLM


def test_naive_merge_drifts_an_order_of_magnitude_more(tmp_path, fixtures, base16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = fixtures / "adapter-qlora"
    merge(adapter, tmp_path / "m", base=base16, dtype="bf16")
    ref = reference_unmerged(adapter, base16)
    ours = (logits_of(tmp_path / "m") - ref).abs().max()
    bnb = bnb_config()
    naive = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base16), quantization_config=bnb, device_map="cpu"),
            str(adapter),
        )
        .merge_and_unload()
        .dequantize()
        .float()
    )
    with torch.no_grad():
        theirs = (naive(input_ids=TOKENS).logits - ref).abs().max()
    assert theirs >= 10 * ours


# ---- bad input and output guarantees ----------------------------------------------------------------


def test_adapter_for_another_base(tmp_path, fixtures):
    from qmerge.demo.tiny import TinySpec, build_base

    other = build_base(
        tmp_path / "other",
        TinySpec(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    )
    with pytest.raises(MismatchError, match="another base"):
        merge(fixtures / "adapter-qlora", tmp_path / "m", base=other)
    assert not (tmp_path / "m").exists()


def test_missing_adapter_tensor(copy_of, tmp_path, base16):
    d = copy_of("adapter-qlora")
    t = load_file(d / "adapter_model.safetensors")
    del t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(InputError, match="only one of lora_A/lora_B"):
        merge(d, tmp_path / "m", base=base16)


def test_nan_in_adapter_leaves_no_output(copy_of, tmp_path, base16):
    d = copy_of("adapter-qlora")
    t = load_file(d / "adapter_model.safetensors")
    key = sorted(k for k in t if "lora_A" in k)[-1]  # late in the stream: some shards already written
    t[key][0, 0] = float("nan")
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(InputError, match="NaN"):
        merge(d, tmp_path / "m", base=base16)
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.qmerge-tmp-*"))


def test_existing_output_needs_force(tmp_path, fixtures, base16):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    with pytest.raises(OutputError, match="pass force=True to replace it") as e:  # the API's keyword
        merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16)
    assert "--" not in str(e.value) and (tmp_path / "m" / "keep").exists()
    with pytest.raises(OutputError, match="no qmerge_provenance.json"):  # not an output qmerge wrote
        merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16, force=True)
    assert (tmp_path / "m" / "keep").exists()
    (tmp_path / "m" / "keep").unlink()
    (tmp_path / "m").rmdir()
    merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16)
    first = (tmp_path / "m" / "qmerge_provenance.json").stat().st_mtime_ns
    merge(fixtures / "adapter-dora", tmp_path / "m", base=base16, force=True)  # qmerge's own output: replaced
    assert (tmp_path / "m" / "qmerge_provenance.json").stat().st_mtime_ns != first


def test_disk_full_and_interrupt_leave_nothing(tmp_path, fixtures, base16, monkeypatch):
    import qmerge.io.safetensors as sio

    real = sio.StreamingSafetensorsWriter.write
    calls = {"n": 0}

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(sio.StreamingSafetensorsWriter, "write", failing)
    with pytest.raises(OutputError, match="disk full"):
        merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))

    def interrupt(self, name, tensor):
        raise KeyboardInterrupt

    monkeypatch.setattr(sio.StreamingSafetensorsWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge(fixtures / "adapter-qlora", tmp_path / "m", base=base16)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


@pytest.mark.parametrize("to", ["merge", "gguf"])
def test_disk_full_in_the_writer_thread(tmp_path, fixtures, base16, monkeypatch, to):
    """ENOSPC where the bytes really go (the writer's thread, mid-file): the same one message, no output."""
    import qmerge.io.direct as direct
    import qmerge.io.stream as stream
    from qmerge.api import export

    real, calls = direct.SequentialFile.write, {"n": 0}

    def full_after_one(self, buf, n):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, buf, n)

    monkeypatch.setattr(stream, "_STAGE_BYTES", 64 * 1024)  # several buffers even for the tiny fixture
    monkeypatch.setattr(direct.SequentialFile, "write", full_after_one)
    out = tmp_path / ("m" if to == "merge" else "m.gguf")
    with pytest.raises(OutputError, match="disk full"):
        if to == "merge":
            merge(fixtures / "adapter-qlora", out, base=base16)
        else:
            export(fixtures / "adapter-qlora", "gguf", out, base=base16)
    assert calls["n"] > 1
    assert not out.exists() and not list(tmp_path.glob(".m*"))


def test_inputs_are_not_modified(tmp_path, fixtures, base16):
    import hashlib

    def digest(d: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(d.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    before = digest(fixtures)
    merge(fixtures / "adapter-dora", tmp_path / "m", base=base16)
    assert digest(fixtures) == before


TIED_VARIANTS = {
    # variant: (LoraConfig extras, whether the merged model stays tied)
    "modules_to_save": ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False),
    "lora_on_lm_head": ({"target_modules": ["q_proj", "lm_head"]}, False),
    # the adapter changes the embedding; PEFT's forward leaves the tied lm_head as the base has it
    "lora_on_embedding": ({"target_modules": ["q_proj", "embed_tokens"]}, False),
    "embedding_to_save": ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, False),
    # ensure_weight_tying: PEFT gives lm_head the embedding's LoRA too (saved as lm_head's own keys), so
    # the merge carries both changed copies, untied
    "lora_on_embedding_tied": (
        {"target_modules": ["q_proj", "embed_tokens"], "ensure_weight_tying": True},
        False,
    ),
}


@pytest.mark.parametrize("variant", sorted(TIED_VARIANTS))
def test_tied_embeddings_merge_as_peft_runs_them(tmp_path, variant):
    """Llama 3.2 / small Qwen2.5 tie lm_head to the embedding. PEFT trains a separate copy of a tied weight
    it changes, and leaves lm_head as the base has it when it changes only the embedding (unless
    ensure_weight_tying): the merge is untied and runs as PEFT's unmerged forward (PEFT's own
    merge_and_unload keeps the tie and gives lm_head the embedding's change)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qmerge.demo.tiny import TinySpec, build_base

    base = build_base(tmp_path / "base", TinySpec(arch="qwen2", tie_word_embeddings=True))
    kw, stays_tied = TIED_VARIANTS[variant]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice to set ensure_weight_tying
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw),
        )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
            if "lora_embedding_B" in n:
                p.mul_(0.05)
    peft.save_pretrained(str(tmp_path / "adapter"))
    merge(tmp_path / "adapter", tmp_path / "m", base=base, dtype="fp32")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is stays_tied
    assert (
        logits_of(tmp_path / "m") - reference_unmerged(tmp_path / "adapter", base)
    ).abs().max() <= FP32_TOL


TOKEN_VARIANTS = {
    # variant: (arch, tied, trainable_token_indices)
    "embedding": ("llama", False, [5, 17, 300]),
    # tied: PEFT gives the tied lm_head the same new rows, so the merge stays tied
    "tied_embedding": ("qwen2", True, [5, 17, 300]),
    "embedding_and_lm_head": ("llama", False, {"embed_tokens": [5, 17], "lm_head": [17, 42]}),
}


@pytest.mark.parametrize("variant", sorted(TOKEN_VARIANTS))
def test_trainable_tokens_merge_and_check_as_peft_runs_them(tmp_path, variant):
    """PEFT's trainable tokens (new rows for chosen token ids, e.g. a chat template's special tokens) beside
    LoRA: merged equal to PEFT's unmerged forward, and the streamed check of the merge passes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qmerge.demo.tiny import TinySpec, build_base
    from qmerge.verify.check import check

    arch, tied, indices = TOKEN_VARIANTS[variant]
    base = build_base(tmp_path / "base", TinySpec(arch=arch, tie_word_embeddings=tied))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
            LoraConfig(
                r=4,
                lora_alpha=8,
                init_lora_weights=False,
                target_modules=["q_proj"],
                trainable_token_indices=indices,
            ),
        )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(0.5 * torch.randn_like(p))
    peft.save_pretrained(str(tmp_path / "adapter"))
    merge(tmp_path / "adapter", tmp_path / "m", base=base, dtype="fp32")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is tied
    ref = reference_unmerged(tmp_path / "adapter", base)
    assert (logits_of(tmp_path / "m") - ref).abs().max() <= FP32_TOL
    report = check(tmp_path / "adapter", tmp_path / "m", base=base, device="cpu")
    assert report.passed and report.metrics.max_abs_logit_diff <= FP32_TOL


def test_trainable_tokens_that_do_not_fit_are_refused(tmp_path, fixtures, base16):
    """Token ids beyond the vocabulary, or rows of the wrong width: one message, exit 1, nothing written."""
    import shutil

    from click.testing import CliRunner

    from qmerge.cli import cli

    adapter = tmp_path / "adapter"
    shutil.copytree(fixtures / "adapter-qlora", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    hidden = tensors[next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))].shape[1]
    for ids, width, message in (([1, 999999], hidden, "beyond the"), ([1, 2], hidden + 1, "configured")):
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": ids}))
        key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        save_file({**tensors, key: torch.zeros(len(ids), width)}, str(adapter / "adapter_model.safetensors"))
        r = CliRunner().invoke(cli, ["merge", str(adapter), "--base", str(base16), "-o", str(tmp_path / "m")])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_output_layer_renamed_at_load_time(tmp_path, tied):
    """GPT-NeoX stores its output layer as embed_out, which transformers 5 loads as lm_head: PEFT names the
    adapter's targets after the model (modules_to_save lm_head), qmerge writes the checkpoint's names; tied,
    with LoRA on the embedding, the merge is untied under the stored name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.test_architectures import COMMON

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_neox", **COMMON, tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    kw = (
        {"target_modules": ["query_key_value", "embed_in"]}
        if tied
        else {"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]}
    )
    adapter = random_adapter(tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, **kw)
    merge(adapter, tmp_path / "m", base=tmp_path / "base", dtype="fp32")
    assert "embed_out.weight" in load_file(str(tmp_path / "m" / "model.safetensors"))
    ref = reference_unmerged(adapter, tmp_path / "base")
    assert (logits_of(tmp_path / "m") - ref).abs().max() <= FP32_TOL


def test_a_plain_adapter_on_a_4bit_base_leaves_transformers_to_the_background(fixtures, base4):
    """Telling whether a tie or a renamed layer is involved must not import transformers in the merging
    process when the adapter touches neither (the config check then runs in a child process)."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from qmerge.pipeline.source import open_checkpoint\n"
        f"open_checkpoint(Path({str(fixtures / 'adapter-qlora')!r}), Path({str(base4)!r}), background=True)\n"
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D layers ([in, out] on disk, quantized transposed) with a fan_in_fan_out adapter,
    from the 16-bit base, from the 4-bit base transformers saves, and from the layout GPT-2's release stores
    (once refused as "config.json does not match the weights", then merged 0.05 off: its Conv1D weights,
    under other names, were quantized untransposed), which the check also passes; that layout holds the
    same weights as the base the adapter names (its values are compared under either name)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=320, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"), quantization_config=bnb_config(torch.bfloat16), device_map="cpu"
    ).save_pretrained(str(tmp_path / "base4"))
    random_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    ref = reference_unmerged(tmp_path / "adapter", tmp_path / "base")
    _as_released(tmp_path / "base", tmp_path / "released", n_positions=128)
    for base in ("base", "base4", "released"):
        merge(tmp_path / "adapter", tmp_path / f"m-{base}", base=tmp_path / base, dtype="fp32")
        assert (logits_of(tmp_path / f"m-{base}") - ref).abs().max() <= FP32_TOL, base
    # the same weights as the base the adapter names ("base"), in the other layout: not another model
    assert check(tmp_path / "adapter", tmp_path / "m-released", tmp_path / "released", max_seqs=1).passed
    tensors = load_file(tmp_path / "released" / "model.safetensors")
    tensors["h.1.mlp.c_fc.weight"] = tensors["h.1.mlp.c_fc.weight"] * 1.5
    save_file(tensors, tmp_path / "released" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MismatchError, match="another model .* weights of h.1.mlp.c_fc.weight differ"):
        merge(tmp_path / "adapter", tmp_path / "m-other", base=tmp_path / "released")


def _as_released(base, out, n_positions: int) -> None:
    """GPT-2's checkpoint as openai-community/gpt2 stores it: saved from the base model (h.0.*, wte, ... without
    transformers' `transformer.` prefix, which transformers adds at load) with the causal-mask buffers."""
    shutil.copytree(base, out)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(out / "model.safetensors").items()}
    mask = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, n_positions)
    tensors |= {f"h.{i}.attn.bias": mask.to(torch.bfloat16) for i in range(2)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
