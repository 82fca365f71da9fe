"""GGUF for llama.cpp, written directly from the merged tensors with the gguf package (gguf-py).

Mapping follows llama.cpp's convert_hf_to_gguf.py: tensor names from gguf.get_tensor_name_map, Q/K rows
of llama-family models permuted from HF's rotate-half RoPE layout to llama.cpp's adjacent pairs (Qwen2 is
not permuted: llama.cpp runs it with NEOX RoPE), 1-D tensors kept in F32, tied embeddings written once.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DependencyError, InputError, UnsupportedError
from ..io.safetensors_io import StreamingFileWriter, tensor_bytes
from ..native import quiet_native_stderr

# HF architecture -> (config model_type, gguf architecture (gguf.MODEL_ARCH member, lower case), permute Q/K)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama", True),
    "MistralForCausalLM": ("mistral", "llama", True),
    "Qwen2ForCausalLM": ("qwen2", "qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", "qwen3", False),
    "GemmaForCausalLM": ("gemma", "gemma", False),
    "Gemma2ForCausalLM": ("gemma2", "gemma2", False),
    "Gemma3ForCausalLM": ("gemma3_text", "gemma3", False),
    "Phi3ForCausalLM": ("phi3", "phi3", False),
}
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")  # RMSNorm by (1 + weight), output tied to the embedding
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "iq4_xs",
)


def supported_types() -> str:
    return ", ".join(DIRECT_TYPES + K_QUANTS)


@dataclass(frozen=True)
class GGUFModelInfo:
    """What the writer needs from config.json."""

    hf_arch: str
    arch: str
    permute_qk: bool
    n_layers: int
    n_head: int
    n_head_kv: int
    hidden: int
    head_dim: int
    n_ff: int
    n_ctx: int
    rope_theta: float
    rope_scaling: dict | None
    rms_eps: float
    vocab_size: int
    tied: bool
    rope_dims: int  # dimensions rotated per head (partial_rotary_factor x head_dim)
    orig_ctx: int | None  # original_max_position_embeddings (phi3 writes it)
    sliding_window: int | None
    attn_softcap: float | None = None  # gemma2
    final_softcap: float | None = None  # gemma2, gemma3

    @property
    def gemma_family(self) -> bool:
        return self.arch in GEMMA_ARCHS


def model_info(config: dict) -> GGUFModelInfo:
    archs = config.get("architectures") or []
    by_type = {model_type: hf for hf, (model_type, _, _) in ARCHITECTURES.items()}
    hf_arch = archs[0] if archs else by_type.get(config.get("model_type"))
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {hf_arch or config.get('model_type')}."
        )
    _, arch, permute = ARCHITECTURES[hf_arch]
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: per layer type; llama.cpp's base is the global one
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or (
        {k: v for k, v in rope.items() if k != "rope_theta"} if rope else None
    )
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    head_dim = int(config.get("head_dim") or hidden // n_head)
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    gemma = arch in GEMMA_ARCHS
    tied = bool(config.get("tie_word_embeddings", gemma))
    if gemma and not tied:
        raise UnsupportedError(
            f"llama.cpp's {arch} architecture always uses the embedding as the output layer, but this model "
            "has its own lm_head (untied, e.g. by an adapter that trained lm_head); export it as "
            "safetensors instead."
        )
    scalar = config.get("query_pre_attn_scalar")
    if arch in ("gemma2", "gemma3") and scalar and int(scalar) not in (head_dim, hidden // n_head):
        raise UnsupportedError(
            f"query_pre_attn_scalar is {scalar}; llama.cpp scales {arch} attention by head_dim ({head_dim}) "
            f"or, for the 27B models, hidden_size / heads ({hidden // n_head}), so the GGUF would not match."
        )
    if arch == "gemma3":
        n_layers = int(config["num_hidden_layers"])
        llama_cpp_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(n_layers)]
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        if pattern != 6 or config.get("layer_types", llama_cpp_types) != llama_cpp_types:
            raise UnsupportedError(
                "llama.cpp runs gemma3 with global attention in every 6th layer and sliding-window attention "
                "in the others; this model's layer_types differ, so the GGUF would not match."
            )
    return GGUFModelInfo(
        hf_arch=hf_arch,
        arch=arch,
        permute_qk=permute,
        n_layers=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        hidden=hidden,
        head_dim=head_dim,
        n_ff=int(config["intermediate_size"]),
        n_ctx=int(config.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        vocab_size=int(config["vocab_size"]),
        tied=tied,
        rope_dims=int(head_dim * partial),
        orig_ctx=config.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings"),
        sliding_window=config.get("sliding_window"),
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
    )


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp adjacent pairs (same as convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_metadata(w, info: GGUFModelInfo) -> None:
    import gguf

    s = info.rope_scaling
    if not s:
        return
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (see rope_tensors)
    elif kind in ("longrope", "su") and info.arch == "phi3":
        # factors as rope_factors_long/short tensors (see rope_tensors); the attention factor as
        # transformers computes it (and convert_hf_to_gguf's Phi3MiniModel)
        attn = s.get("attention_factor")
        scale = info.n_ctx / float(info.orig_ctx or info.n_ctx)
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(float(info.orig_ctx))) if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(float(attn))
    else:
        raise UnsupportedError(
            f"RoPE scaling {kind!r} is not supported for GGUF export of {info.hf_arch} (linear, yarn and "
            "llama3 are, and longrope for Phi-3)."
        )


def rope_tensors(info: GGUFModelInfo) -> list[tuple[str, np.ndarray]]:
    """Extra F32 tensors llama.cpp reads RoPE scaling from: Llama 3's rope_freqs, Phi-3's long/short
    factors (as convert_hf_to_gguf writes them)."""
    import gguf

    freqs = llama3_rope_freqs(info)
    if freqs is not None:
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)]
    s = info.rope_scaling or {}
    if info.arch != "phi3" or s.get("rope_type", s.get("type")) not in ("longrope", "su"):
        return []
    out = []
    for key, tensor in (
        ("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
        ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT),
    ):
        factors = s.get(key)
        if not factors or len(factors) * 2 != info.rope_dims:
            raise InputError(
                f"config.json: Phi-3 longrope needs {key} with {info.rope_dims // 2} values, got "
                f"{len(factors or [])}."
            )
        out.append((gguf.TENSOR_NAMES[tensor] + ".weight", np.array(factors, dtype=np.float32)))
    return out


def llama3_rope_freqs(info: GGUFModelInfo) -> np.ndarray | None:
    """The rope_freqs factors llama.cpp needs for Llama 3.1 style scaling (as convert_hf_to_gguf computes)."""
    s = info.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return None
    base, dim = info.rope_theta, info.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# ---- tokenizer --------------------------------------------------------------------------------------


def _bpe_pre(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its pre_tokenizer (a small known table)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp), not "gpt2"
    if "\\\\p{N}{1,3}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "llama-bpe"
    if "\\\\p{N}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "qwen2"
    return "default"


def add_tokenizer(w, model_dir: Path, vocab_size: int) -> str:
    """Write the vocabulary, merges/scores, special tokens and chat template. Returns the tokenizer kind."""
    import gguf

    tj_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    if sp_path.exists():
        kind = _add_sentencepiece(w, sp_path, vocab_size)
    elif tj_path.exists():
        kind = _add_bpe(w, model_dir, tj_path, vocab_size)
    else:
        raise InputError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; llama.cpp needs the vocabulary in the GGUF."
        )
    special = gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=vocab_size)
    special.add_to_gguf(w)
    if special.chat_template is None and (model_dir / "chat_template.jinja").exists():
        w.add_chat_template((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    return kind


def _add_bpe(w, model_dir: Path, tj_path: Path, vocab_size: int) -> str:
    import gguf
    from transformers import AutoTokenizer

    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UnsupportedError(
            f"{tj_path}: tokenizer model {(tj.get('model') or {}).get('type')} is not supported for GGUF (BPE and SentencePiece are)."
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise InputError(
            f"{tj_path}: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings."
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_bpe_pre(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    return "gpt2"


def _add_sentencepiece(w, sp_path: Path, vocab_size: int) -> str:
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise DependencyError("exporting a SentencePiece tokenizer needs the sentencepiece package.") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(sp_path))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return "llama"


# ---- tensors ----------------------------------------------------------------------------------------


def _ggml_type(gguf_type: str, shape: tuple[int, ...]):
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32":
        return T.F32
    if gguf_type == "f16":
        return T.F16
    if gguf_type == "bf16":
        return T.BF16
    # q8_0 needs rows that are whole 32-value blocks; llama.cpp's converter falls back the same way.
    return T.Q8_0 if shape[-1] % 32 == 0 else T.F16


def torch_dtype_for(qtype) -> torch.dtype:
    """The dtype a tensor is merged into before encoding as `qtype` (quantized types start from fp32)."""
    import gguf

    T = gguf.GGMLQuantizationType
    return {T.F16: torch.float16, T.BF16: torch.bfloat16}.get(qtype, torch.float32)


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """A torch tensor in the bytes GGUF stores for `qtype` (F32, F16, BF16 or Q8_0), as flat uint8.

    F16 and BF16 are torch's round-to-nearest-even casts, the same values numpy and gguf-py produce.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16, T.BF16):
        return tensor_bytes(t.to(torch_dtype_for(qtype)))
    data = gguf.quants.quantize(t.float().contiguous().numpy(), qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


class TensorMapper:
    """HF tensor names -> GGUF names and the transform each needs."""

    def __init__(self, info: GGUFModelInfo):
        import gguf

        self.info = info
        self.map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[info.arch.upper()], info.n_layers)

    def name(self, hf_name: str) -> str | None:
        """The GGUF name, or None for tensors llama.cpp does not use (rotary inv_freq buffers)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        if hf_name == "lm_head.weight" and self.info.tied:
            return None
        new = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UnsupportedError(f"tensor {hf_name} has no GGUF counterpart for {self.info.hf_arch}.")
        return new

    def transform(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        if self.info.gemma_family and hf_name.endswith("norm.weight"):
            return t + 1  # HF Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight
        if self.info.permute_qk:
            if ".self_attn.q_proj." in hf_name:
                return permute_qk(t, self.info.n_head)
            if ".self_attn.k_proj." in hf_name:
                return permute_qk(t, self.info.n_head_kv)
        return t


def write_gguf(
    path: Path,
    config: dict,
    model_dir: Path,
    shapes: dict[str, tuple[int, ...]],
    tensors: Callable[[list[str], dict[str, torch.dtype]], Iterator[tuple[str, torch.Tensor]]],
    gguf_type: str,
    name: str = "model",
) -> dict:
    """Stream tensors into a GGUF file of a direct type (f32, f16, bf16, q8_0). Returns a summary, with the
    file's sha256 (computed while writing).

    `tensors(order, dtypes)` yields (name, tensor) in `order`, each floating tensor in dtypes[name].
    """
    import gguf

    info = model_info(config)
    mapper = TensorMapper(info)
    w = gguf.GGUFWriter(None, info.arch)
    w.add_name(name)
    w.add_context_length(info.n_ctx)
    w.add_embedding_length(info.hidden)
    w.add_block_count(info.n_layers)
    w.add_feed_forward_length(info.n_ff)
    w.add_head_count(info.n_head)
    w.add_head_count_kv(info.n_head_kv)
    w.add_rope_dimension_count(info.rope_dims)
    if info.arch == "gemma2":  # as convert_hf_to_gguf's Gemma2Model
        w.add_attn_logit_softcapping(float(info.attn_softcap or 0.0))
        w.add_final_logit_softcapping(float(info.final_softcap or 0.0))
        w.add_sliding_window(int(info.sliding_window or 0))
    if info.arch == "gemma3":  # as convert_hf_to_gguf's Gemma3Model
        if info.final_softcap:
            w.add_final_logit_softcapping(float(info.final_softcap))
        w.add_sliding_window(int(info.sliding_window or 0))
    if info.arch == "phi3":  # as convert_hf_to_gguf's Phi3MiniModel
        if info.orig_ctx:
            w.add_rope_scaling_orig_ctx_len(int(info.orig_ctx))
        w.add_sliding_window(int(info.sliding_window or 0))
    if info.head_dim != info.hidden // info.n_head:
        w.add_key_length(info.head_dim)
        w.add_value_length(info.head_dim)
    w.add_rope_freq_base(info.rope_theta)
    w.add_layer_norm_rms_eps(info.rms_eps)
    w.add_vocab_size(info.vocab_size)
    _rope_metadata(w, info)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    w.add_file_type(ftype)
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = add_tokenizer(w, model_dir, info.vocab_size)
    if info.gemma_family and tokenizer == "llama":
        w.add_add_space_prefix(False)  # as convert_hf_to_gguf's GemmaModel

    order, types = [], {}
    extra = rope_tensors(info)
    for extra_name, values in extra:
        w.add_tensor_info(extra_name, values.shape, np.float32, values.nbytes)
    for hf in sorted(shapes):
        new = mapper.name(hf)
        if new is None:
            continue
        shape = tuple(shapes[hf])
        qtype = _ggml_type(gguf_type, shape)
        types[hf] = qtype
        order.append(hf)
        w.add_tensor_info(
            new,
            shape,
            np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16,
            _nbytes(shape, qtype),
            raw_dtype=qtype,
        )
    head = _gguf_head(w, path)
    align = w.data_alignment
    out = StreamingFileWriter(path, head + bytes(-len(head) % align))
    counts: dict[str, int] = {}
    try:
        for _, values in extra:
            _append(out, values.reshape(-1).view(np.uint8), align)
        stream = tensors(order, {hf: torch_dtype_for(q) for hf, q in types.items()})
        for hf in order:
            out.wait_for_room(_nbytes(tuple(shapes[hf]), types[hf]))  # before the tensor is computed
            got, t = next(stream)
            if got != hf:
                raise RuntimeError(f"expected tensor {hf} next, got {got}")
            _append(out, encode(mapper.transform(hf, t), types[hf]), align)
            counts[types[hf].name] = counts.get(types[hf].name, 0) + 1
        out.close()
    except BaseException:
        out.abort()
        raise
    return {
        "gguf_architecture": info.arch,
        "tensor_types": counts,
        "tokenizer": tokenizer,
        "sha256": out.sha256,
    }


def _gguf_head(w, path: Path) -> bytes:
    """Header, metadata and tensor infos as gguf-py writes them (through a sibling file it removes)."""
    head_path = path.with_name(path.name + ".head")
    try:
        w.write_header_to_file(head_path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return head_path.read_bytes()
    finally:
        head_path.unlink(missing_ok=True)


def _append(out: StreamingFileWriter, data: np.ndarray, align: int) -> None:
    """One tensor's bytes, then zeros up to the file's data alignment (as gguf-py pads)."""
    out.write_bytes(data)
    if len(data) % align:
        out.write_bytes(np.zeros(-len(data) % align, dtype=np.uint8))


def quantize_with_llama_cpp(src: Path, dst: Path, gguf_type: str) -> None:
    """K-quants and legacy quants through llama.cpp's own quantizer (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise DependencyError(
            f"--gguf-type {gguf_type} uses llama.cpp's quantizer: pip install llama-cpp-python."
        ) from e
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if ftype is None:
        raise UnsupportedError(f"the installed llama-cpp-python has no {gguf_type} quantizer.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, min(8, os.cpu_count() or 1))
    with quiet_native_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise UnsupportedError(f"llama.cpp could not quantize to {gguf_type} (return code {rc}).")
