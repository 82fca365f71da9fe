"""GGUF export checked by loading the files in llama.cpp (llama-cpp-python) and comparing logits with
the merged model run by transformers, on every architecture GGUF export supports."""

from __future__ import annotations

import pytest
import torch

from qmerge.api import export
from qmerge.demo.tiny import TinySpec, build_base
from qmerge.errors import UnsupportedError
from qmerge.llama_cpp import llama
from tests.export.models import DENSE
from tests.helpers import inspect_path, kl_top1, logits_of, random_adapter

llama_cpp = pytest.importorskip("llama_cpp")

SEQ = torch.tensor([[1, 17, 45, 99, 120, 7, 250, 33, 64, 81, 200, 5, 9, 300, 150, 42, 11, 12, 13, 14]])
F32_TOL = 1e-3  # the bound; measured ~1e-6 with an f32 KV cache


def llama_cpp_logits(path, tokens=SEQ) -> torch.Tensor:
    llm = llama(
        llama_cpp,
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        n_threads=2,
    )
    llm.eval(tokens[0].tolist())
    out = torch.from_numpy(llm.scores[: tokens.shape[1]].copy()).unsqueeze(0)
    llm.close()
    return out


def _tie_gap(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """The largest gap, in the reference's logits, between its top token and the candidate's top token
    (0 where they agree): a flip between two tokens the reference nearly ties is rounding, not a wrong
    mapping (a tiny random model has such near ties at a few positions)."""
    picked = ref.gather(-1, cand.argmax(-1, keepdim=True)).squeeze(-1)
    return float((ref.max(-1).values - picked).max())


@pytest.mark.parametrize("arch", [arch for arch, _ in DENSE])
def test_gguf_types_against_transformers(tmp_path, arch_adapters, arch):
    base, adapter = arch_adapters[arch]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    ref = logits_of(tmp_path / "merged", SEQ)
    for gtype in ("f32", "f16", "bf16", "q8_0"):
        out = tmp_path / f"m-{gtype}.gguf"
        export(adapter, "gguf", out, base=base, gguf_type=gtype)
        cand = llama_cpp_logits(out)
        kl, _top1 = kl_top1(ref, cand)
        if gtype == "f32":
            assert (cand - ref).abs().max() <= F32_TOL, arch
        else:  # measured 2e-9 to 1.6e-4; top-1 may differ only where the reference is a near tie
            assert kl <= 1e-3, (arch, gtype, kl)
            assert _tie_gap(ref, cand) <= 0.05, (arch, gtype)


def test_k_quant_runs_and_is_reported(tmp_path, arch_adapters):
    from qmerge.verify.check import check
    from qmerge.verify.metrics import Thresholds

    base, adapter = arch_adapters["llama"]
    report = export(adapter, "gguf", tmp_path / "q4.gguf", base=base, gguf_type="q4_k_m")
    assert report.details["gguf_type"] == "q4_k_m" and report.details["tensor_types"]
    rep = check(adapter, tmp_path / "q4.gguf", base=base, thresholds=Thresholds(None, None, None))
    assert rep.candidate_kind == "gguf" and rep.metrics.n_tokens > 0


def test_token_embedding_and_output_types(tmp_path, arch_adapters):
    """--gguf-embedding-type / --gguf-output-type reach llama.cpp's quantizer (its --token-embedding-type /
    --output-tensor-type): the file holds those types there, llama.cpp's rule elsewhere, and runs; for a file
    qmerge writes itself they are refused with one message, nothing written."""
    import gguf
    from click.testing import CliRunner

    from qmerge.cli import cli
    from qmerge.formats.gguf import TensorTypes

    base, adapter = arch_adapters["llama"]
    types = TensorTypes("q8_0", "q5_0")
    export(adapter, "gguf", tmp_path / "a.gguf", base=base, gguf_type="q4_k_m", tensor_types=types)
    export(adapter, "gguf", tmp_path / "b.gguf", base=base, gguf_type="q4_k_m")
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}
    rule = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert ours.pop("token_embd.weight") == "Q8_0" and ours.pop("output.weight") == "Q5_0"
    assert rule.pop("token_embd.weight") != "Q8_0"
    del rule["output.weight"]
    assert ours == rule
    assert torch.isfinite(llama_cpp_logits(tmp_path / "a.gguf")).all()
    r = CliRunner().invoke(
        cli,
        ["export", str(adapter), "--base", str(base), "--to", "gguf", "--gguf-type", "f16"]
        + ["--gguf-embedding-type", "q8_0", "-o", str(tmp_path / "c.gguf")],
    )
    assert r.exit_code == 2 and "llama.cpp's quantizer writes the file" in r.output
    with pytest.raises(UnsupportedError, match="not whole q6_k blocks of 256"):  # llama.cpp would abort
        export(
            adapter,
            "gguf",
            tmp_path / "c.gguf",
            base=base,
            gguf_type="q4_k_m",
            tensor_types=TensorTypes(None, "q6_k"),
        )
    assert not (tmp_path / "c.gguf").exists()


def test_output_type_of_a_tied_model_lands_on_the_embedding(tmp_path, arch_adapters):
    """Tied embeddings (qwen2): llama.cpp gives the embedding the output type, so that is what is checked
    against its rows; a fitting type is written there."""
    import gguf

    from qmerge.formats.gguf import TensorTypes

    base, adapter = arch_adapters["qwen2"]
    with pytest.raises(UnsupportedError, match="token_embd.weight: rows of 64"):
        export(
            adapter,
            "gguf",
            tmp_path / "a.gguf",
            base=base,
            gguf_type="q4_k_m",
            tensor_types=TensorTypes(None, "q6_k"),
        )
    export(
        adapter,
        "gguf",
        tmp_path / "b.gguf",
        base=base,
        gguf_type="q4_k_m",
        tensor_types=TensorTypes(None, "q8_0"),
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"


def test_gguf_metadata_and_inspect(tmp_path, arch_adapters):
    base, adapter = arch_adapters["qwen2"]
    export(adapter, "gguf", tmp_path / "q.gguf", base=base, gguf_type="f16")
    info = inspect_path(tmp_path / "q.gguf")
    meta = info["metadata"]
    assert info["architecture"] == "qwen2"
    assert meta["qwen2.attention.head_count_kv"] == 2 and meta["qwen2.context_length"] == 256
    assert abs(meta["qwen2.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert meta["tokenizer.ggml.model"] == "gpt2" and "tokenizer.chat_template" in meta
    names = {m["name"] for m in info["modules"]}
    assert "output.weight" not in names and "blk.0.attn_q.bias" in names  # tied embeddings, q bias


@pytest.mark.parametrize("gtype", ["f32", "f16", "bf16"])
def test_gguf_py_reads_every_tensor_at_its_offset(tmp_path, arch_adapters, gtype):
    """gguf-py's reader finds each streamed tensor where the header says, with the merged model's values
    (qwen2: no Q/K permutation), and the sha256 reported is the file's."""
    import hashlib

    import gguf
    from safetensors.torch import load_file

    base, adapter = arch_adapters["qwen2"]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    report = export(adapter, "gguf", tmp_path / "q.gguf", base=base, gguf_type=gtype)
    raw = (tmp_path / "q.gguf").read_bytes()
    assert report.files[0].sha256 == hashlib.sha256(raw).hexdigest() and report.files[0].bytes == len(raw)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert reader.alignment and all(t.data_offset % reader.alignment == 0 for t in reader.tensors)
    stored = {t.name: t for t in reader.tensors}
    assert len(stored) == len(merged) - ("lm_head.weight" in merged)
    for hf, want in merged.items():
        if hf == "lm_head.weight":
            continue
        t = stored[names.get_name(hf, try_suffixes=(".weight", ".bias"))]
        got = torch.from_numpy(t.data.copy())
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            got = got.view(torch.bfloat16)
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.tensor_type.name]
        assert torch.equal(got.reshape(want.shape).float(), want.to(dtype).float()), hf


def test_check_accepts_gguf(tmp_path, fixtures, base16):
    from qmerge.verify.check import check

    export(fixtures / "adapter-dora", "gguf", tmp_path / "m.gguf", base=base16, gguf_type="f32")
    rep = check(fixtures / "adapter-dora", tmp_path / "m.gguf", base=base16)
    assert rep.passed and rep.metrics.max_abs_logit_diff < F32_TOL


def test_unsupported_type_and_architecture(tmp_path, fixtures, base16):
    with pytest.raises(UnsupportedError, match="q4_k_m"):
        export(fixtures / "adapter-qlora", "gguf", tmp_path / "x.gguf", base=base16, gguf_type="q9_z")
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=64)
    OPTForCausalLM(opt).save_pretrained(str(tmp_path / "opt"))  # (llama.cpp has no OPT)
    with pytest.raises(
        UnsupportedError,
        match="OPTForCausalLM, which qmerge does not write as GGUF.*llama, .*convert_hf_to_gguf",
    ):
        export(tmp_path / "opt", "gguf", tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "x.gguf").exists()
    # llama.cpp's gemma has no separate output layer: an untied Gemma would lose its lm_head
    untied = build_base(tmp_path / "gemma", TinySpec(arch="gemma", tie_word_embeddings=False))
    with pytest.raises(UnsupportedError, match="lm_head"):
        export(untied, "gguf", tmp_path / "u.gguf")
    assert not (tmp_path / "u.gguf").exists()


def test_sentencepiece_tokenizer(tmp_path, fixtures, base16):
    """A base with tokenizer.model (SentencePiece) exports a `llama` vocabulary that llama.cpp loads."""
    import shutil

    from qmerge.demo.tiny import build_sentencepiece

    base = tmp_path / "sp-base"
    shutil.copytree(base16, base)
    build_sentencepiece(base / "tokenizer.model")
    export(
        fixtures / "adapter-dora", "gguf", tmp_path / "sp.gguf", base=base, gguf_type="f32"
    )  # no tokenizer of its own
    meta = inspect_path(tmp_path / "sp.gguf")["metadata"]
    assert meta["tokenizer.ggml.model"] == "llama" and inspect_path(tmp_path / "sp.gguf")["vocab_size"] == 320
    export(fixtures / "adapter-dora", "fp32", tmp_path / "merged", base=base)
    cand = llama_cpp_logits(tmp_path / "sp.gguf")
    assert (cand - logits_of(tmp_path / "merged", SEQ)).abs().max() <= F32_TOL


def test_llama32_layout_rope_scaling_and_tied(tmp_path):
    """Llama 3.2's layout: llama3 RoPE scaling (carried as rope_freqs) and tied embeddings."""
    import json

    base = build_base(tmp_path / "base", TinySpec(arch="llama", tie_word_embeddings=True))
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_parameters"] = {
        "rope_theta": 500000.0,
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (base / "config.json").write_text(json.dumps(cfg))
    random_adapter(
        base, tmp_path / "adapter", seed=0, b_scale=1.0, r=4, lora_alpha=8, target_modules="all-linear"
    )
    export(tmp_path / "adapter", "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32")
    export(tmp_path / "adapter", "fp32", tmp_path / "m", base=base)
    assert "rope_freqs.weight" in {m["name"] for m in inspect_path(tmp_path / "m.gguf")["modules"]}
    assert (llama_cpp_logits(tmp_path / "m.gguf") - logits_of(tmp_path / "m", SEQ)).abs().max() <= F32_TOL


def test_phi3_longrope(tmp_path):
    """Phi-3 128k / Phi-3.5 layout: longrope factors as rope_factors_long/short tensors and the attention
    factor in the metadata; llama.cpp's logits match transformers' on a short sequence (short factors)."""
    import json
    import math

    base = build_base(tmp_path / "base", TinySpec(arch="phi3"))
    cfg = json.loads((base / "config.json").read_text())
    g = torch.Generator().manual_seed(3)
    half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    # llama.cpp takes the long factors when its context (padded to 256) exceeds the original length,
    # transformers when the sequence does: a 4096 original length keeps both on the short factors here
    cfg["original_max_position_embeddings"], cfg["max_position_embeddings"] = 4096, 16384
    cfg["rope_parameters"] = {
        "rope_theta": 10000.0,
        "rope_type": "longrope",
        "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 4096,
        "long_factor": (1 + 3 * torch.rand(half, generator=g)).tolist(),
        "short_factor": (1 + torch.rand(half, generator=g)).tolist(),
    }
    (base / "config.json").write_text(json.dumps(cfg))
    export(base, "gguf", tmp_path / "m.gguf", gguf_type="f32")
    info = inspect_path(tmp_path / "m.gguf")
    names = {m["name"] for m in info["modules"]}
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= names
    attn = (1 + math.log(16384 / 4096) / math.log(4096)) ** 0.5  # transformers' longrope attention factor
    assert abs(info["metadata"]["phi3.rope.scaling.attn_factor"] - attn) < 1e-6
    ref = logits_of(base, SEQ)
    assert (llama_cpp_logits(tmp_path / "m.gguf") - ref).abs().max() <= F32_TOL


def test_gemma_attention_scale_llama_cpp_cannot_express_is_refused():
    from qmerge.io.gguf.families import architecture_of

    def model_info(config):
        return architecture_of(config)[0]

    cfg = dict(
        architectures=["Gemma2ForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        vocab_size=320,
        tie_word_embeddings=True,
    )
    assert model_info({**cfg, "query_pre_attn_scalar": 32}).gguf_arch == "gemma2"  # head_dim
    assert model_info({**cfg, "query_pre_attn_scalar": 16}).gguf_arch == "gemma2"  # hidden / heads (27B)
    with pytest.raises(UnsupportedError, match="query_pre_attn_scalar"):
        model_info({**cfg, "query_pre_attn_scalar": 100})
    with pytest.raises(UnsupportedError, match="lm_head"):
        model_info({**cfg, "tie_word_embeddings": False})
    g3 = {**cfg, "architectures": ["Gemma3ForCausalLM"], "query_pre_attn_scalar": 32, "num_hidden_layers": 7}
    sliding, full = "sliding_attention", "full_attention"
    assert model_info({**g3, "layer_types": [sliding] * 5 + [full, sliding]}).gguf_arch == "gemma3"
    with pytest.raises(UnsupportedError, match="layer_types"):
        model_info({**g3, "layer_types": [sliding, full] * 3 + [sliding]})


def test_granite_smollm3_olmo2_configs_llama_cpp_cannot_express_are_refused():
    from qmerge.io.gguf.families import architecture_of

    cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=320)
    granite = {**cfg, "architectures": ["GraniteForCausalLM"], "num_hidden_layers": 2}
    assert architecture_of({**granite, "head_dim": 16})[0].gguf_arch == "granite"
    with pytest.raises(UnsupportedError, match="head_dim"):
        architecture_of({**granite, "head_dim": 32})
    smol = {**cfg, "architectures": ["SmolLM3ForCausalLM"], "num_hidden_layers": 8}
    assert architecture_of({**smol, "no_rope_layers": [1, 1, 1, 0] * 2})[0].gguf_arch == "smollm3"
    for other in (
        {"no_rope_layers": [1] * 8},
        {"no_rope_layers": [1, 1, 0, 1] * 2},
        {"use_sliding_window": True},
    ):
        with pytest.raises(UnsupportedError, match="every 4th layer"):
            architecture_of({**smol, **other})
    olmo2 = {**cfg, "architectures": ["Olmo2ForCausalLM"], "num_hidden_layers": 2}
    assert architecture_of(olmo2)[0].gguf_arch == "olmo2"
    with pytest.raises(UnsupportedError, match="output layer of its own"):
        architecture_of({**olmo2, "tie_word_embeddings": True})
    with pytest.raises(UnsupportedError, match="sliding window"):
        architecture_of({**olmo2, "sliding_window": 4096})
