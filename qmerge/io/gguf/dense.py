"""Dense decoders that differ from Llama in more than tensor names: scaled branches (Granite), layers
without RoPE (SmolLM3, Cohere 2), norms after attention and MLP (OLMo 2, GLM-4), LayerNorm and parallel
blocks (Cohere 2); each refuses what llama.cpp's architecture of that name fixes and a config changes."""

from __future__ import annotations

from ...errors import UnsupportedError
from .arch import Architecture, HParams, every_nth


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
        llama_cpp_rope = every_nth(hp.n_layers, 4, 0, 1)
        if config.get("no_rope_layers", llama_cpp_rope) != llama_cpp_rope or config.get("use_sliding_window"):
            raise UnsupportedError(
                "llama.cpp runs smollm3 with RoPE left out of every 4th layer and no sliding window; this "
                "model's no_rope_layers or use_sliding_window differ, so the GGUF would not match."
            )


class Glm4(Architecture):
    """GLM-4 (0414): norms after attention and MLP besides before, gate and up fused in one tensor, RoPE on
    half of each head by adjacent pairs (llama.cpp's order already: nothing permuted)."""

    hf_class, model_type, gguf_arch, permute_qk, partial_rotary = (
        "Glm4ForCausalLM",
        "glm4",
        "glm4",
        False,
        0.5,
    )


class Olmo2(Architecture):
    """OLMo 2: Q/K norms over the whole projection, norms after attention and MLP instead of before, NEOX
    RoPE (convert_hf_to_gguf's Olmo2Model); no sliding window."""

    hf_class, model_type, gguf_arch, permute_qk, own_output = (
        "Olmo2ForCausalLM",
        "olmo2",
        "olmo2",
        False,
        True,
    )

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if hp.sliding_window:
            raise UnsupportedError(
                "this olmo2 model has a sliding window; qmerge writes OLMo 2 without one (as OLMo 2 runs), "
                "so the GGUF would not match."
            )


class Cohere2(Architecture):
    """Command R7B (Cohere 2): LayerNorm without bias, attention and MLP in parallel, sliding-window layers
    with RoPE by adjacent pairs and every 4th layer global without RoPE, logits scaled (Cohere2Model)."""

    hf_class, model_type, gguf_arch, permute_qk = "Cohere2ForCausalLM", "cohere2", "cohere2", False
    tied_output = layer_norm = True

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        llama_cpp_types = every_nth(hp.n_layers, 4, "full_attention", "sliding_attention")
        if config.get("layer_types", llama_cpp_types) != llama_cpp_types:
            raise UnsupportedError(
                "llama.cpp runs cohere2 with global attention in every 4th layer and sliding-window attention "
                "in the others; this model's layer_types differ, so the GGUF would not match."
            )
        if config.get("attention_bias") or hp.head_dim * hp.n_head != hp.hidden:
            raise UnsupportedError(
                "llama.cpp's cohere2 architecture has no attention biases and heads that fill hidden_size "
                f"exactly; this model has attention_bias {config.get('attention_bias')} and {hp.n_head} heads of "
                f"{hp.head_dim}, so it could not load the GGUF."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        w.add_logit_scale(float((hp.config or {}).get("logit_scale", 1.0)))
        w.add_sliding_window(int(hp.sliding_window or 0))


class Ministral3(Architecture):
    """Ministral 3: a Llama (Q/K rows permuted) with YaRN, whose mscale_all_dim and Llama 4 style attention
    temperature (llama_4_scaling_beta) llama.cpp's mistral3 reads (convert_hf_to_gguf's Ministral3Model)."""

    hf_class, model_type, gguf_arch = "Ministral3ForCausalLM", "ministral3", "mistral3"

    def add_metadata(self, w, hp: HParams) -> None:
        rope = hp.rope_scaling or {}
        if rope.get("rope_type", rope.get("type")) == "yarn":
            w.add_rope_scaling_yarn_log_mul(float(rope["mscale_all_dim"]))
            w.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))
