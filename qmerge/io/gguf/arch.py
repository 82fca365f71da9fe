"""One record per architecture GGUF export supports, as llama.cpp's convert_hf_to_gguf.py keeps one class
per architecture: what it reads from config.json, what it writes as metadata, how tensors change, and
what llama.cpp cannot express (refused with a message)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InputError, UnsupportedError


@dataclass(frozen=True)
class HParams:
    """What the writer needs from config.json."""

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
    config: dict | None = None  # config.json itself, for keys only one architecture reads


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp adjacent pairs (same as convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _int(config: dict, key: str, default: object = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise InputError(f"config.json: {key} is {value!r}; GGUF export needs a positive integer.")
    return value


def read_hparams(config: dict, arch: str) -> HParams:
    """HParams from a transformers config.json (transformers 5 keeps RoPE under rope_parameters)."""
    n_head, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
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
    return HParams(
        n_layers=_int(config, "num_hidden_layers"),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        hidden=hidden,
        head_dim=head_dim,
        n_ff=_int(config, "intermediate_size"),
        n_ctx=int(config.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        vocab_size=_int(config, "vocab_size"),
        tied=bool(config.get("tie_word_embeddings", arch in GEMMA_ARCHS)),
        rope_dims=int(head_dim * partial),
        orig_ctx=config.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings"),
        sliding_window=config.get("sliding_window"),
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
        config=config,
    )


class Architecture:
    """A Llama-family decoder as llama.cpp's `llama` architecture runs it (RoPE rows permuted)."""

    hf_class = "LlamaForCausalLM"
    model_type = "llama"
    gguf_arch = "llama"
    permute_qk = True
    gemma_norm = False  # RMSNorm by (1 + weight): llama.cpp stores weight + 1

    def check(self, config: dict, hp: HParams) -> None:
        """Refuse what llama.cpp would run differently from transformers."""

    def add_metadata(self, w, hp: HParams) -> None:
        """Architecture-specific keys beyond the common ones."""

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        if self.gemma_norm and hf_name.endswith("norm.weight"):
            return t + 1  # HF Gemma's RMSNorm scales by (1 + weight); llama.cpp's by weight
        if self.permute_qk:
            if ".self_attn.q_proj." in hf_name:
                return permute_qk(t, hp.n_head)
            if ".self_attn.k_proj." in hf_name:
                return permute_qk(t, hp.n_head_kv)
        return t


class Mistral(Architecture):
    """Mistral runs as llama.cpp's `llama` (it has no architecture of its own)."""

    hf_class, model_type = "MistralForCausalLM", "mistral"


class Qwen2(Architecture):
    """Qwen2: Q/K rows NOT permuted (llama.cpp applies NEOX-style RoPE to it)."""

    hf_class, model_type, gguf_arch, permute_qk = "Qwen2ForCausalLM", "qwen2", "qwen2", False


class Qwen3(Qwen2):
    hf_class, model_type, gguf_arch = "Qwen3ForCausalLM", "qwen3", "qwen3"


class Gemma(Architecture):
    """Gemma: norms stored as weight + 1; the output layer is always the embedding (tied)."""

    hf_class, model_type, gguf_arch, permute_qk, gemma_norm = (
        "GemmaForCausalLM",
        "gemma",
        "gemma",
        False,
        True,
    )

    def check(self, config: dict, hp: HParams) -> None:
        if not hp.tied:
            raise UnsupportedError(
                f"llama.cpp's {self.gguf_arch} architecture always uses the embedding as the output layer, but "
                "this model has its own lm_head (untied by an adapter that changed lm_head or the embedding but "
                "not both the same way); export it "
                "as safetensors instead."
            )


class Gemma2(Gemma):
    """Gemma 2: attention and final logit soft-capping, sliding window (as convert_hf_to_gguf's Gemma2Model)."""

    hf_class, model_type, gguf_arch = "Gemma2ForCausalLM", "gemma2", "gemma2"

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        scalar = config.get("query_pre_attn_scalar")
        if scalar and int(scalar) not in (hp.head_dim, hp.hidden // hp.n_head):
            raise UnsupportedError(
                f"query_pre_attn_scalar is {scalar}; llama.cpp scales {self.gguf_arch} attention by head_dim "
                f"({hp.head_dim}) or, for the 27B models, hidden_size / heads ({hp.hidden // hp.n_head}), so "
                "the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_attn_logit_softcapping(float(hp.attn_softcap or 0.0))
        w.add_final_logit_softcapping(float(hp.final_softcap or 0.0))
        w.add_sliding_window(int(hp.sliding_window or 0))


class Gemma3(Gemma2):
    """Gemma 3: global RoPE base, sliding window, global attention in every 6th layer (Gemma3Model)."""

    hf_class, model_type, gguf_arch = "Gemma3ForCausalLM", "gemma3_text", "gemma3"

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        llama_cpp_types = [
            "full_attention" if i % 6 == 5 else "sliding_attention" for i in range(hp.n_layers)
        ]
        pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        if pattern != 6 or config.get("layer_types", llama_cpp_types) != llama_cpp_types:
            raise UnsupportedError(
                "llama.cpp runs gemma3 with global attention in every 6th layer and sliding-window attention "
                "in the others; this model's layer_types differ, so the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        if hp.final_softcap:
            w.add_final_logit_softcapping(float(hp.final_softcap))
        w.add_sliding_window(int(hp.sliding_window or 0))


class Phi3(Architecture):
    """Phi-3: fused qkv and gate_up, partial rotary, original context, sliding window (Phi3MiniModel)."""

    hf_class, model_type, gguf_arch, permute_qk = "Phi3ForCausalLM", "phi3", "phi3", False

    def add_metadata(self, w, hp: HParams) -> None:
        if hp.orig_ctx:
            w.add_rope_scaling_orig_ctx_len(int(hp.orig_ctx))
        w.add_sliding_window(int(hp.sliding_window or 0))


class Granite(Architecture):
    """Granite: a Llama whose embedding, residual branches, attention and logits are scaled by four
    config multipliers, written as llama.cpp's scales (convert_hf_to_gguf's GraniteModel)."""

    hf_class, model_type, gguf_arch = "GraniteForCausalLM", "granite", "granite"
    SCALES = {
        "attention_multiplier": "add_attention_scale",
        "embedding_multiplier": "add_embedding_scale",
        "residual_multiplier": "add_residual_scale",
        "logits_scaling": "add_logit_scale",
    }

    def check(self, config: dict, hp: HParams) -> None:
        if hp.head_dim != hp.hidden // hp.n_head:
            raise UnsupportedError(
                f"head_dim is {hp.head_dim}, not hidden_size / heads ({hp.hidden // hp.n_head}); llama.cpp's "
                "granite architecture has no head_dim of its own, so the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        for key, add in self.SCALES.items():
            if value := (hp.config or {}).get(key):  # as convert_hf_to_gguf: 0 or absent is not written
                getattr(w, add)(float(value))


class SmolLM3(Architecture):
    """SmolLM3: a Llama without RoPE in every 4th layer, which llama.cpp's smollm3 architecture fixes."""

    hf_class, model_type, gguf_arch = "SmolLM3ForCausalLM", "smollm3", "smollm3"

    def check(self, config: dict, hp: HParams) -> None:
        llama_cpp_rope = [int((i + 1) % 4 != 0) for i in range(hp.n_layers)]
        if config.get("no_rope_layers", llama_cpp_rope) != llama_cpp_rope or config.get("use_sliding_window"):
            raise UnsupportedError(
                "llama.cpp runs smollm3 with RoPE left out of every 4th layer and no sliding window; this "
                "model's no_rope_layers or use_sliding_window differ, so the GGUF would not match."
            )


class Olmo2(Architecture):
    """OLMo 2: Q/K norms over the whole projection, norms after attention and MLP instead of before, NEOX
    RoPE (convert_hf_to_gguf's Olmo2Model); no sliding window."""

    hf_class, model_type, gguf_arch, permute_qk = "Olmo2ForCausalLM", "olmo2", "olmo2", False

    def check(self, config: dict, hp: HParams) -> None:
        if hp.tied:
            raise UnsupportedError(
                "llama.cpp's olmo2 architecture needs an output layer of its own, but this model ties it to "
                "the embedding (OLMo 2 checkpoints do not); export it as safetensors instead."
            )
        if hp.sliding_window:
            raise UnsupportedError(
                "this olmo2 model has a sliding window; qmerge writes OLMo 2 without one (as OLMo 2 runs), "
                "so the GGUF would not match."
            )


ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a
    for a in (
        Architecture(),
        Mistral(),
        Qwen2(),
        Qwen3(),
        Gemma(),
        Gemma2(),
        Gemma3(),
        Phi3(),
        Granite(),
        SmolLM3(),
        Olmo2(),
    )
}
GEMMA_ARCHS = tuple(a.gguf_arch for a in ARCHITECTURES.values() if a.gemma_norm)


def architecture_of(config: dict) -> tuple[Architecture, HParams]:
    """The architecture record and hyperparameters of a config.json, or UnsupportedError."""
    archs = config.get("architectures") or []
    by_type = {a.model_type: name for name, a in ARCHITECTURES.items()}
    hf_arch = archs[0] if isinstance(archs, list) and archs else by_type.get(config.get("model_type"))
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"qmerge writes GGUF for {', '.join(ARCHITECTURES)}; this model is "
            f"{hf_arch or config.get('model_type')}. The route for it: export the merge in 16 bits "
            "(qmerge export ADAPTER --to bf16 -o MERGED), then convert it with llama.cpp's "
            "convert_hf_to_gguf.py MERGED (with --mmproj for a vision model's projector), and measure the "
            "GGUF with qmerge check ADAPTER --candidate FILE.gguf."
        )
    arch = ARCHITECTURES[hf_arch]
    hp = read_hparams(config, arch.gguf_arch)
    arch.check(config, hp)
    return arch, hp
