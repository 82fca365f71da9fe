"""One record per architecture GGUF export supports, as llama.cpp's convert_hf_to_gguf.py keeps one class
per architecture: what it reads from config.json, what it writes as metadata, how tensors change, and
what llama.cpp cannot express (refused with a message). Llama and the decoders that differ from it in
names and norms are here, others in dense.py, the mixture-of-experts ones in moe.py, the table in
families.py."""

from __future__ import annotations

import re
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
    n_ff: int | list[int]  # one size, or one per layer (Gemma 3n)
    n_ctx: int
    rope_theta: float
    rope_scaling: dict | None
    norm_eps: float  # RMSNorm's epsilon, or LayerNorm's where the architecture has LayerNorm
    vocab_size: int
    tied: bool
    rope_dims: int  # dimensions rotated per head (partial_rotary_factor x head_dim)
    orig_ctx: int | None  # original_max_position_embeddings (phi3 writes it)
    sliding_window: int | None
    attn_softcap: float | None = None  # gemma2
    final_softcap: float | None = None  # gemma2, gemma3
    config: dict | None = None  # config.json itself, for keys only one architecture reads
    n_expert: int = 0  # routed experts (0: a dense model)
    n_expert_used: int = 0
    n_ff_exp: int | None = None  # one expert's feed-forward size, where it differs from n_ff
    n_ff_shexp: int | None = None  # the shared expert's (Qwen2-MoE)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp adjacent pairs (same as convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def every_nth(n_layers: int, every: int, nth: object, other: object) -> list:
    """A per-layer pattern llama.cpp fixes for an architecture: `nth` in every `every`-th layer, `other` in
    the rest (global attention among sliding-window layers, layers without RoPE)."""
    return [nth if (i + 1) % every == 0 else other for i in range(n_layers)]


def _int(config: dict, key: str, default: object = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise InputError(f"config.json: {key} is {value!r}; GGUF export needs a positive integer.")
    return value


def read_hparams(config: dict, arch: Architecture) -> HParams:
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
    partial = float(
        rope.get("partial_rotary_factor", config.get("partial_rotary_factor", arch.partial_rotary))
    )
    return HParams(
        n_layers=_int(config, "num_hidden_layers"),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        hidden=hidden,
        head_dim=head_dim,
        n_ff=_ff(config, arch.ff_key),
        n_ctx=int(config.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(config.get("layer_norm_eps" if arch.layer_norm else "rms_norm_eps") or 1e-6),
        vocab_size=_int(config, "vocab_size"),
        tied=bool(config.get("tie_word_embeddings", arch.gemma_norm)),  # Gemma ties unless told
        rope_dims=int(head_dim * partial),
        orig_ctx=config.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings"),
        sliding_window=config.get("sliding_window"),
        attn_softcap=config.get("attn_logit_softcapping"),
        final_softcap=config.get("final_logit_softcapping"),
        config=config,
        n_expert=int(_first(config, "num_local_experts", "num_experts", "n_routed_experts") or 0),
        n_expert_used=int(_first(config, "num_experts_per_tok", "num_experts_per_token") or 0),
        n_ff_exp=config.get(arch.ff_exp_key),
        n_ff_shexp=config.get("shared_expert_intermediate_size"),
    )


def _ff(config: dict, key: str) -> int | list[int]:
    """The feed-forward size: one, or one per layer."""
    sizes = config.get(key)
    if isinstance(sizes, list) and sizes and all(type(v) is int and v > 0 for v in sizes):
        return sizes
    return _int(config, key)


_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


def expert_of(hf_name: str) -> tuple[str, int] | None:
    """(the name of the stack `hf_name` belongs to, its expert index), or None for a tensor of its own:
    `model.layers.0.mlp.experts.3.up_proj.weight` -> (`model.layers.0.mlp.experts.up_proj.weight`, 3)."""
    m = _EXPERT.match(hf_name)
    return (f"{m['head']}.{m['tail']}", int(m["index"])) if m else None


GELU = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
)  # exact or tanh: llama.cpp runs its table of both
SILU = (None, "silu")


def activation_only(config: dict, key: str, allowed: tuple, arch: str, name: str) -> None:
    """Refuse a model whose activation (config.json's `key`) llama.cpp's `arch` does not run."""
    if config.get(key) not in allowed:
        raise UnsupportedError(
            f"{key} is {config.get(key)!r}; llama.cpp's {arch} runs {name} only, so the GGUF would not match."
        )


def _first(config: dict, *keys: str) -> object:
    """The first of `keys` config.json sets (as convert_hf_to_gguf's find_hparam)."""
    return next((config[k] for k in keys if config.get(k) is not None), None)


class Architecture:
    """A Llama-family decoder as llama.cpp's `llama` architecture runs it (RoPE rows permuted)."""

    hf_class = "LlamaForCausalLM"
    model_type = "llama"
    gguf_arch = "llama"
    permute_qk = True
    gemma_norm = False  # RMSNorm by (1 + weight): llama.cpp stores weight + 1
    own_output = False  # llama.cpp needs output.weight: it cannot use the embedding in its place
    partial_rotary = 1.0  # the share of each head RoPE rotates when config.json does not say
    tied_output = False  # llama.cpp always uses the embedding as the output layer
    layer_norm = False  # LayerNorm (without bias) in place of RMSNorm
    vision = False  # a vision-language checkpoint whose language model is written (vlm.py)
    merge_fp32 = False  # transform() scales values: merged in fp32 and cast to the file's type after it
    ff_key = "intermediate_size"  # the dense feed-forward size's config key
    ff_exp_key = "moe_intermediate_size"  # one routed expert's
    no_lora_gguf: tuple[str, ...] = ()  # name parts of tensors a llama.cpp LoRA cannot carry as stored

    def text_name(self, hf_name: str) -> str | None:
        """The tensor's name as a text-only checkpoint has it (None: a tensor the GGUF leaves out)."""
        return hf_name

    def kv_heads(self, hp: HParams) -> int | list[int]:
        """head_count_kv as llama.cpp reads it: one count, or one per layer (0 where a layer has no
        attention)."""
        return hp.n_head_kv

    def adjust(self, hp: HParams) -> HParams:
        """The hyperparameters as llama.cpp's architecture reads them, where it holds the model otherwise."""
        return hp

    def hf_params(self, config: dict) -> dict:
        """config.json with the keys read_hparams reads, where the model's config names them otherwise."""
        return config

    def variant(self, config: dict) -> Architecture:
        """The record for this config where one model class is written as several llama.cpp architectures
        (Granite 4.0's class without Mamba layers is llama.cpp's granite)."""
        return self

    def stack_of(self, hf_name: str, hp: HParams) -> tuple[str, int, int] | None:
        """(the 3-D tensor llama.cpp holds `hf_name` in, its index there, how many it holds) where the
        checkpoint stores the pieces apart (an MoE's per-expert tensors), or None: a tensor of its own."""
        found = expert_of(hf_name) if hp.n_expert else None
        return (*found, hp.n_expert) if found else None

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        """The tensors (names as llama.cpp's converter names them before mapping, shapes) a stored tensor
        becomes when llama.cpp holds it as several (fused experts), or None: it stays one."""
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        """The values of split()'s tensors, in its order (one with fewer rows than its shape is written with
        the rest as copies of its first row: writer.encode_parts)."""
        raise NotImplementedError(name)

    def check(self, config: dict, hp: HParams) -> None:
        """Refuse what llama.cpp would run differently from transformers."""
        if self.own_output and hp.tied:
            raise UnsupportedError(
                f"llama.cpp's {self.gguf_arch} architecture needs an output layer of its own, but this model "
                f"ties it to the embedding ({self.model_type} checkpoints do not); export it as safetensors "
                "instead."
            )
        if self.tied_output and not hp.tied:
            raise UnsupportedError(
                f"llama.cpp's {self.gguf_arch} architecture always uses the embedding as the output layer, but "
                "this model has its own lm_head (untied by an adapter that changed lm_head or the embedding but "
                "not both the same way); export it as safetensors instead."
            )

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

    hf_class, model_type, gguf_arch, permute_qk = "GemmaForCausalLM", "gemma", "gemma", False
    gemma_norm = tied_output = True


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
        llama_cpp_types = every_nth(hp.n_layers, 6, "full_attention", "sliding_attention")
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
        config = hp.config or {}
        local = ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
        if (
            local := local or config.get("rope_local_base_freq")
        ) is not None:  # the sliding layers' RoPE base
            w.add_rope_freq_base_swa(float(local))


class Phi3(Architecture):
    """Phi-3: fused qkv and gate_up, partial rotary, original context, sliding window (Phi3MiniModel)."""

    hf_class, model_type, gguf_arch, permute_qk = "Phi3ForCausalLM", "phi3", "phi3", False

    def add_metadata(self, w, hp: HParams) -> None:
        if hp.orig_ctx:
            w.add_rope_scaling_orig_ctx_len(int(hp.orig_ctx))
        w.add_sliding_window(int(hp.sliding_window or 0))
