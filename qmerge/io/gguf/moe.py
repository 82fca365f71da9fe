"""Mixture-of-experts decoders as llama.cpp runs them: the experts of a layer stored one tensor per expert
(`...experts.E.gate_proj.weight`) are written as one 3-D tensor per projection (`blk.N.ffn_gate_exps`,
experts first, as convert_hf_to_gguf.py stacks them), the router in F32, and the expert counts as metadata.

llama.cpp fixes per architecture what transformers reads from config.json (whether the chosen experts'
weights are renormalized, which layers are sparse): a config that differs is refused, since the GGUF would
answer differently from the model that was checked."""

from __future__ import annotations

import dataclasses

import torch

from ...errors import UnsupportedError
from .arch import Architecture, HParams, Qwen2, Qwen3, every_nth


def fused_experts(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
    """The tensors llama.cpp holds for experts stored fused, [experts, in, out] (gpt-oss, Llama 4):
    gate_up_proj -> gate and up experts [experts, ff, in]; down_proj -> [experts, out, ff]; else None."""
    head = name.rsplit(".", 1)[0]  # ...experts
    if name.endswith("experts.gate_up_proj"):
        e, n_in, ff2 = shape
        return [(f"{head}.{p}.weight", (e, ff2 // 2, n_in)) for p in ("gate_proj", "up_proj")]
    if name.endswith("experts.down_proj"):
        return [(f"{head}.down_proj.weight", (shape[0], shape[2], shape[1]))]
    return None


class MoE(Architecture):
    """The expert counts llama.cpp reads, and what it fixes that transformers reads from config.json."""

    norm_topk = True  # llama.cpp renormalizes the chosen experts' weights (build_moe_ffn's norm_w)
    norm_key: str | None = "norm_topk_prob"  # the config key transformers reads it from (default False)

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if hp.n_expert <= 0 or hp.n_expert_used <= 0:
            raise UnsupportedError(
                f"config.json names no expert counts (num_experts / num_experts_per_tok) for this "
                f"{self.model_type} model, so llama.cpp could not run its experts."
            )
        if self.norm_key and bool(config.get(self.norm_key, False)) != self.norm_topk:
            raise UnsupportedError(
                f"config.json sets {self.norm_key} to {bool(config.get(self.norm_key, False))}, but llama.cpp's "
                f"{self.gguf_arch} architecture always {'renormalizes' if self.norm_topk else 'keeps'} the chosen "
                "experts' weights, so the GGUF would not match."
            )
        sparse_step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
        if sparse_step not in (None, 1) or dense:
            raise UnsupportedError(
                f"this model has dense layers among its expert layers (decoder_sparse_step {sparse_step}, "
                f"mlp_only_layers {dense}); llama.cpp's {self.gguf_arch} architecture gives every layer "
                "experts, so the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        super().add_metadata(w, hp)
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
        if hp.n_ff_exp is not None:
            w.add_expert_feed_forward_length(int(hp.n_ff_exp))
        if hp.n_ff_shexp is not None:
            w.add_expert_shared_feed_forward_length(int(hp.n_ff_shexp))


class Mixtral(MoE):
    """Mixtral runs as llama.cpp's `llama` with experts (Q/K rows permuted, weights always renormalized)."""

    hf_class, model_type, norm_key = "MixtralForCausalLM", "mixtral", None


class Qwen2Moe(MoE, Qwen2):
    """Qwen1.5/Qwen2-MoE: a shared expert beside the routed ones, gated by a sigmoid; no renormalization."""

    hf_class, model_type, gguf_arch, norm_topk = "Qwen2MoeForCausalLM", "qwen2_moe", "qwen2moe", False
    own_output = True


class Qwen3Moe(MoE, Qwen3):
    """Qwen3-MoE: Q/K norms, chosen experts' weights renormalized (Qwen3-30B-A3B sets norm_topk_prob)."""

    hf_class, model_type, gguf_arch = "Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe"


class Olmoe(MoE):
    """OLMoE: Q/K norms over the whole projection (one size for both: llama.cpp has no GQA form of them),
    NEOX RoPE, an output layer of its own, no renormalization."""

    hf_class, model_type, gguf_arch, norm_topk = "OlmoeForCausalLM", "olmoe", "olmoe", False
    permute_qk, own_output = False, True

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if hp.n_head_kv != hp.n_head:
            raise UnsupportedError(
                f"this olmoe model has {hp.n_head_kv} key/value heads for {hp.n_head} query heads; llama.cpp's "
                "olmoe architecture sizes the key norm for as many as the queries, so it could not load it."
            )
        if config.get("clip_qkv") is not None:
            raise UnsupportedError(
                f"config.json sets clip_qkv ({config['clip_qkv']}); llama.cpp's olmoe architecture does not "
                "clip Q/K/V, so the GGUF would not match."
            )


class GptOss(MoE):
    """gpt-oss with its experts in 16 bits (as a merge writes them; llama.cpp's converter takes them so too):
    the fused gate/up experts (gate and up interleaved, [experts, in, 2 x ff]) split into llama.cpp's gate
    and up experts, down experts transposed, biases split alike, attention sinks; sliding-window attention
    in every other layer, SwiGLU clamped at 7 (llama.cpp fixes both) (convert_hf_to_gguf's GptOssModel)."""

    hf_class, model_type, gguf_arch, permute_qk, norm_key = (
        "GptOssForCausalLM",
        "gpt_oss",
        "gpt-oss",
        False,
        None,
    )

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        llama_cpp_types = every_nth(hp.n_layers, 2, "full_attention", "sliding_attention")
        if (
            config.get("layer_types", llama_cpp_types) != llama_cpp_types
            or config.get("swiglu_limit", 7.0) != 7.0
        ):
            raise UnsupportedError(
                "llama.cpp runs gpt-oss with sliding-window attention in even layers and SwiGLU clamped at 7; "
                f"this model's layer_types or swiglu_limit ({config.get('swiglu_limit')}) differ, so the GGUF "
                "would not match."
            )

    ff_exp_key = "intermediate_size"

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_sliding_window(int(hp.sliding_window or 0))
        super().add_metadata(w, hp)

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if pieces := fused_experts(name, shape):
            return pieces
        head = name.rsplit(".", 1)[0]  # ...mlp.experts
        if name.endswith("experts.gate_up_proj_bias"):
            return [(f"{head}.{p}.bias", (shape[0], shape[1] // 2)) for p in ("gate_proj", "up_proj")]
        if name.endswith("experts.down_proj_bias"):
            return [(f"{head}.down_proj.bias", shape)]
        if name.endswith("self_attn.sinks"):
            return [(name + ".weight", shape)]
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if name.endswith("experts.gate_up_proj"):
            t = t.transpose(-1, -2)
            return [t[:, 0::2, :], t[:, 1::2, :]]
        if name.endswith("experts.gate_up_proj_bias"):
            return [t[..., 0::2], t[..., 1::2]]
        if name.endswith("experts.down_proj"):
            return [t.transpose(-1, -2)]
        return [t]


class Llama4(MoE):
    """Llama 4's language model: MoE layers every interleave_moe_layer_step-th with a shared expert, fused
    gate/up experts split in halves, sigmoid routing; RoPE by adjacent pairs (nothing permuted) left out of
    every 4th layer, chunked attention of 8192 and attention temperature tuning as llama.cpp fixes them, Q/K
    L2 norms unless 128 experts (convert_hf_to_gguf's Llama4Model)."""

    hf_class, model_type, gguf_arch, permute_qk, norm_key = (
        "Llama4ForCausalLM",
        "llama4_text",
        "llama4",
        False,
        None,
    )
    ff_key, ff_exp_key = "intermediate_size_mlp", "intermediate_size"
    FIXED = {
        "attention_chunk_size": 8192,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
    }

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        step = int(config.get("interleave_moe_layer_step", 1))
        expected = {
            **self.FIXED,
            "no_rope_layers": every_nth(hp.n_layers, 4, 0, 1),
            "moe_layers": list(range(step - 1, hp.n_layers, step)),
            "use_qk_norm": hp.n_expert != 128,
        }
        if differ := [k for k, v in expected.items() if config.get(k, v) != v]:
            raise UnsupportedError(
                f"llama.cpp's llama4 architecture fixes {', '.join(f'{k} = {expected[k]}' for k in differ)}; "
                f"this model has {', '.join(f'{config.get(k)}' for k in differ)}, so the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_interleave_moe_layer_step(int((hp.config or {}).get("interleave_moe_layer_step", 1)))
        super().add_metadata(w, hp)

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        return fused_experts(name, shape)

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        t = t.transpose(-1, -2)
        return list(t.chunk(2, dim=-2)) if name.endswith("experts.gate_up_proj") else [t]


class DeepseekV3(MoE):
    """DeepSeek-V3 (and R1, Kimi K2's layout): multi-head latent attention as llama.cpp's deepseek2 holds it
    (one key/value head of the latent's size; kv_b_proj split into k_b, transposed, and v_b), sigmoid routing
    with the score-correction bias, shared experts, leading dense layers; RoPE by adjacent pairs
    (rope_interleave, as V3 has it) (convert_hf_to_gguf's DeepseekV2Model)."""

    hf_class, model_type, gguf_arch, permute_qk, norm_key = (
        "DeepseekV3ForCausalLM",
        "deepseek_v3",
        "deepseek2",
        False,
        None,
    )

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if not config.get("rope_interleave", True) or config.get("scoring_func", "sigmoid") != "sigmoid":
            raise UnsupportedError(
                "llama.cpp's deepseek2 architecture runs DeepSeek-V3 with RoPE on adjacent pairs "
                "(rope_interleave) and sigmoid routing; this model's rope_interleave or scoring_func differ, so "
                "the GGUF would not match."
            )

    def adjust(self, hp: HParams) -> HParams:
        c = hp.config or {}
        return dataclasses.replace(
            hp, n_head_kv=1, rope_dims=int(c["qk_rope_head_dim"]), head_dim=hp.hidden // hp.n_head
        )  # key/value lengths are MLA's (add_metadata)

    def add_metadata(self, w, hp: HParams) -> None:
        import gguf

        c = hp.config or {}
        kv_lora = int(c["kv_lora_rank"])
        w.add_leading_dense_block_count(int(c.get("first_k_dense_replace") or 0))
        if c.get("q_lora_rank"):
            w.add_q_lora_rank(int(c["q_lora_rank"]))
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + int(c["qk_rope_head_dim"]))
        w.add_value_length(kv_lora)
        w.add_key_length_mla(int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]))
        w.add_value_length_mla(int(c["v_head_dim"]))
        super().add_metadata(w, hp)
        w.add_expert_shared_count(int(c.get("n_shared_experts") or 0))
        if c.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(float(c["routed_scaling_factor"]))
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # what transformers' DeepSeek-V3 runs
        w.add_expert_group_count(int(c.get("n_group") or 1))
        w.add_expert_group_used_count(int(c.get("topk_group") or 1))
        if (mscale := (hp.rope_scaling or {}).get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * float(mscale))  # as the converter writes it for deepseek2

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if name.endswith("mlp.gate.e_score_correction_bias"):
            return [(name.replace("e_score_correction_bias", "e_score_correction.bias"), shape)]
        if name.endswith("self_attn.kv_b_proj.weight"):
            c, (rows, kv_lora) = hp.config or {}, shape
            n_kv, nope, v = (
                rows // (c["qk_nope_head_dim"] + c["v_head_dim"]),
                c["qk_nope_head_dim"],
                c["v_head_dim"],
            )
            return [
                (name.replace("kv_b_proj", "k_b_proj"), (n_kv, kv_lora, nope)),
                (name.replace("kv_b_proj", "v_b_proj"), (n_kv, v, kv_lora)),
            ]
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if name.endswith("self_attn.kv_b_proj.weight"):
            nope, v = (hp.config or {})["qk_nope_head_dim"], (hp.config or {})["v_head_dim"]
            kv_b = t.reshape(-1, nope + v, t.shape[-1])
            k_b, v_b = kv_b.split([nope, v], dim=1)
            return [k_b.transpose(1, 2), v_b]
        return [t]
