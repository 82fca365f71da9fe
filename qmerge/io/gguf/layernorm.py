"""The decoders with LayerNorm (with bias) as llama.cpp runs them: GPT-2, GPT-NeoX (Pythia), Phi-1/1.5/2,
StableLM and StarCoder 2 (convert_hf_to_gguf's GPT2Model, GPTNeoXModel, Phi2Model, StableLMModel and
StarCoder2Model): RoPE on part of each head by NEOX pairs (nothing permuted), biases where the models have them.

Some configs name the sizes otherwise (GPT-2's n_embd, n_head, ...; StarCoder 2's norm_epsilon; GPT-NeoX
carries no key/value head count): hf_params states them as the other records read them, from the model's own
keys only."""

from __future__ import annotations

import re

import torch

from ...errors import UnsupportedError
from .arch import GELU, SILU, Architecture, HParams, activation_only


class GPTNeoX(Architecture):
    """GPT-NeoX: Q/K/V fused per head ([heads, 3, head_dim] rows, regrouped as all Q, all K, all V), NEOX
    RoPE on rotary_pct of each head (nothing permuted), attention and MLP in parallel or in sequence."""

    hf_class, model_type, gguf_arch, permute_qk = "GPTNeoXForCausalLM", "gpt_neox", "gptneox", False
    layer_norm = own_output = True

    def hf_params(self, config: dict) -> dict:
        return {**config, "num_key_value_heads": config.get("num_attention_heads")}  # multi-head attention

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "hidden_act", GELU, self.gguf_arch, "GELU")
        _biases_needed(config, "attention_bias", self.gguf_arch)

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_parallel_residual(bool((hp.config or {}).get("use_parallel_residual", True)))

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        if ".attention.query_key_value." not in hf_name:
            return t
        per_head = t.reshape(hp.n_head, 3, hp.head_dim, *t.shape[1:])
        return per_head.transpose(0, 1).reshape(t.shape)


class GPT2(Architecture):
    """GPT-2: learned positions, Conv1D weights stored [in, out] (transposed here), the output layer the
    embedding, Q/K/V fused as all Q, all K, all V."""

    hf_class, model_type, gguf_arch, permute_qk = "GPT2LMHeadModel", "gpt2", "gpt2", False
    layer_norm = True
    CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

    def hf_params(self, config: dict) -> dict:
        n_embd, n_head = config.get("n_embd"), config.get("n_head")
        sizes = {
            "hidden_size": n_embd,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_head,
            "num_hidden_layers": config.get("n_layer"),
            "max_position_embeddings": config.get("n_positions"),
            "layer_norm_eps": config.get("layer_norm_epsilon"),
            "intermediate_size": config.get("n_inner") or (4 * n_embd if type(n_embd) is int else None),
            "head_dim": None,
            "rope_parameters": None,
        }
        return {**config, **sizes}

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "activation_function", GELU, self.gguf_arch, "GELU")
        if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
            raise UnsupportedError(
                "config.json sets scale_attn_by_inverse_layer_idx or unsets scale_attn_weights; llama.cpp's "
                "gpt2 scales attention by the head size only, so the GGUF would not match."
            )

    def text_name(self, hf_name: str) -> str | None:
        return None if hf_name.endswith((".attn.bias", ".attn.masked_bias")) else hf_name  # (old buffers)

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        return [(name, (shape[1], shape[0]))] if name.endswith(self.CONV1D) else None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        return [t.transpose(0, 1)]


class Phi2(Architecture):
    """Phi-1/1.5/2 (`PhiForCausalLM`): attention and MLP in parallel off one LayerNorm, NEOX RoPE on
    partial_rotary_factor of each head (nothing permuted), an output layer with bias. The converter writes the
    key/value heads as the query heads and the feed-forward as 4 x hidden whatever config.json says; qmerge
    writes the config's (the same for Phi-2's releases)."""

    hf_class, model_type, gguf_arch, permute_qk = "PhiForCausalLM", "phi", "phi2", False
    layer_norm = own_output = True

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "hidden_act", GELU, self.gguf_arch, "GELU")
        if config.get("qk_layernorm"):
            raise UnsupportedError(
                "config.json sets qk_layernorm; llama.cpp's phi2 has no norm on the queries and keys, so the "
                "GGUF would not match."
            )


class StableLM(Architecture):
    """StableLM (StableLM 2, 3B): partial RoPE, a gated SiLU MLP, attention and MLP in sequence or (no second
    norm) in parallel, per-head Q/K LayerNorms (StableLM 2 12B) stacked into one tensor each, as the
    converter stacks them."""

    hf_class, model_type, gguf_arch, permute_qk = "StableLmForCausalLM", "stablelm", "stablelm", False
    layer_norm = own_output = True
    HEAD_NORM = re.compile(r"^(?P<norm>.+\.self_attn\.(?P<qk>[qk])_layernorm)\.norms\.(?P<head>\d+)\.weight$")

    def stack_of(self, hf_name: str, hp: HParams) -> tuple[str, int, int] | None:
        m = self.HEAD_NORM.match(hf_name)
        heads = hp.n_head if m and m["qk"] == "q" else hp.n_head_kv
        return (f"{m['norm']}.weight", int(m["head"]), heads) if m else None

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "hidden_act", SILU, self.gguf_arch, "SiLU")

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_parallel_residual(bool((hp.config or {}).get("use_parallel_residual")))


class Starcoder2(Architecture):
    """StarCoder 2: biases throughout, a GELU MLP (c_fc, c_proj). llama.cpp runs it without the sliding window
    transformers applies past sliding_window tokens (4096 in the releases), as the converter writes it."""

    hf_class, model_type, gguf_arch, permute_qk = "Starcoder2ForCausalLM", "starcoder2", "starcoder2", False
    layer_norm = True

    def hf_params(self, config: dict) -> dict:
        return {**config, "layer_norm_eps": config.get("norm_epsilon")}

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "hidden_act", GELU, self.gguf_arch, "GELU")
        _biases_needed(config, "use_bias", self.gguf_arch)


def _biases_needed(config: dict, key: str, arch: str) -> None:
    """Refuse a model without the biases llama.cpp's architecture loads as required."""
    if config.get(key) is False:
        raise UnsupportedError(
            f"config.json unsets {key}; llama.cpp's {arch} needs the model's biases, so it could not load the GGUF."
        )
