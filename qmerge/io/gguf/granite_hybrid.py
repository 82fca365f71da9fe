"""IBM's Granite 4.0-H (`granitemoehybrid`) and Bamba as llama.cpp's granitehybrid runs them
(convert_hf_to_gguf's GraniteHybridModel): Mamba-2 layers and attention layers (a layer is recurrent where
its KV head count is 0), Granite's four scales, experts with a shared expert (or the shared MLP alone as a
dense feed-forward), RoPE for Bamba only.

Where the converter is wrong, qmerge writes what llama.cpp needs to answer as transformers does: Bamba rotates
half of each head (its partial_rotary_factor), so only that half's rows are permuted for llama.cpp's RoPE
(the converter permutes the whole head); a dense Granite 4.0-H's feed-forward length is its shared MLP's;
the vocabulary is not padded past the embedding's rows."""

from __future__ import annotations

import dataclasses

import torch

from ...errors import UnsupportedError
from .arch import SILU, Architecture, HParams, activation_only, permute_qk
from .dense import Granite
from .hybrid import mamba2_cut, mamba2_split, ssm_int
from .moe import MoE


def permute_rotary(w: torch.Tensor, n_head: int, rope_dims: int) -> torch.Tensor:
    """permute_qk on the dimensions RoPE rotates (the first `rope_dims` of each head), the rest kept: partial
    RoPE rotates pairs (i, i + rope_dims / 2) in transformers, adjacent pairs of the first rope_dims in
    llama.cpp."""
    heads = w.reshape(n_head, w.shape[0] // n_head, *w.shape[1:])
    rotated = permute_qk(heads[:, :rope_dims].reshape(n_head * rope_dims, *w.shape[1:]), n_head)
    return torch.cat([rotated.reshape(n_head, rope_dims, *w.shape[1:]), heads[:, rope_dims:]], 1).reshape(
        w.shape
    )


ATTENTION = ("attention", "full_attention")  # (config.json's name, and transformers 5's)


class GraniteHybrid(MoE):
    """Granite 4.0-H: Mamba-2 layers and attention layers without RoPE, each with experts beside a shared
    MLP (or the shared MLP alone), the experts' gate and up fused in one stored tensor, split here."""

    hf_class, model_type, gguf_arch = "GraniteMoeHybridForCausalLM", "granitemoehybrid", "granitehybrid"
    norm_key = None  # the router's softmax over the chosen experts' logits: renormalized, as llama.cpp's
    permute_qk = False  # (transform permutes the rotated rows)
    rope = False  # whether llama.cpp's architecture runs RoPE for it
    rope_always = False  # whether transformers' class does, whatever position_embedding_type says
    SCALES = Granite.SCALES

    def attention_layers(self, hp: HParams) -> list[int]:
        config = hp.config or {}
        if (indices := config.get("attn_layer_indices")) is not None:
            return [int(i) for i in indices]
        return [i for i, t in enumerate(config.get("layer_types") or []) if t in ATTENTION]

    def variant(self, config: dict) -> Architecture:
        types = config.get("layer_types") or []
        if types and all(t in ATTENTION for t in types):  # Granite 4.0 without "-H"
            return GraniteMoeAttention() if config.get("num_local_experts") else GraniteAttention()
        return self

    def kv_heads(self, hp: HParams) -> list[int]:
        attention = set(self.attention_layers(hp))
        return [hp.n_head_kv if i in attention else 0 for i in range(hp.n_layers)]

    def adjust(self, hp: HParams) -> HParams:
        shared = (hp.config or {}).get("shared_intermediate_size")
        n_ctx = hp.n_ctx if self.rope else 2**20  # as the converter writes it without RoPE
        if hp.n_expert:
            return dataclasses.replace(hp, n_ctx=n_ctx, n_ff_shexp=shared or None)
        return dataclasses.replace(hp, n_ctx=n_ctx, n_ff=shared or hp.n_ff)  # the shared MLP is the FFN

    def check(self, config: dict, hp: HParams) -> None:
        if hp.n_expert:
            super().check(config, hp)
        else:
            Architecture.check(self, config, hp)
        activation_only(config, "hidden_act", SILU, self.gguf_arch, "SiLU")
        rope = self.rope_always or config.get("position_embedding_type") == "rope"
        problems = {
            "position_embedding_type": (
                rope == self.rope,
                f"{'' if self.rope else 'no '}RoPE in such a model",
            ),
        }
        if self.gguf_arch == "granitehybrid":
            problems["mamba_expand"] = (ssm_int(config, "expand") == 2, "Mamba-2 layers 2x wide only")
            problems["mamba_proj_bias"] = (not config.get("mamba_proj_bias"), "no bias on the SSM's input")
        for key, (ok, what) in problems.items():
            if not ok:
                raise UnsupportedError(
                    f"config.json sets {key} to {config.get(key)!r}; llama.cpp's {self.gguf_arch} architecture "
                    f"runs {what}, so the GGUF would not match."
                )

    def add_metadata(self, w, hp: HParams) -> None:
        if hp.n_expert:
            super().add_metadata(w, hp)  # expert counts, the shared expert's length
        c = hp.config or {}
        Granite.add_metadata(self, w, hp)  # (Bamba's config has no scales)
        w.add_ssm_conv_kernel(ssm_int(c, "d_conv"))
        w.add_ssm_state_size(ssm_int(c, "d_state"))
        w.add_ssm_group_count(ssm_int(c, "n_groups"))
        w.add_ssm_inner_size(ssm_int(c, "expand") * hp.hidden)
        w.add_ssm_time_step_rank(ssm_int(c, "n_heads"))
        w.add_rope_scaling_finetuned(self.rope)  # granitehybrid's switch for RoPE

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        if ".self_attn.q_proj." in hf_name:
            return permute_rotary(t, hp.n_head, hp.rope_dims)
        if ".self_attn.k_proj." in hf_name:
            return permute_rotary(t, hp.n_head_kv, hp.rope_dims)
        return t

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if ".mamba." in name:
            return mamba2_split(name, shape, ssm_int(hp.config or {}, "n_groups"))
        layer, _, tail = name.partition(
            ".block_sparse_moe." if ".block_sparse_moe." in name else ".shared_mlp."
        )
        if tail == "input_linear.weight":  # gate and up in one tensor, gate first
            half = (*shape[:-2], shape[-2] // 2, shape[-1])
            mlp = (
                "mlp.experts" if "block_sparse_moe" in name else "mlp.shared_expert" if hp.n_expert else "mlp"
            )
            return [(f"{layer}.{mlp}.{p}.weight", half) for p in ("gate_proj", "up_proj")]
        if tail == "output_linear.weight" and ".shared_mlp." in name and not hp.n_expert:
            return [(f"{layer}.mlp.down_proj.weight", shape)]  # the dense FFN's, not a shared expert's
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if ".mamba." in name:
            return [mamba2_cut(name, t, ssm_int(hp.config or {}, "n_groups"))]
        return list(t.chunk(2, dim=-2)) if name.endswith("input_linear.weight") else [t]


class Bamba(GraniteHybrid):
    """Bamba: Granite 4.0-H's layout with a dense feed-forward and RoPE on half of each head."""

    hf_class, model_type = "BambaForCausalLM", "bamba"
    rope = rope_always = True


class GraniteAttention(GraniteHybrid):
    """Granite 4.0's class with attention in every layer (Granite 4.0 Micro): llama.cpp's granite, with RoPE
    and the shared MLP as its feed-forward (as the converter writes it, SSM keys included)."""

    gguf_arch, rope = "granite", True


class GraniteMoeAttention(GraniteAttention):
    """The same with experts: llama.cpp's granitemoe."""

    gguf_arch = "granitemoe"


class GraniteMoe(GraniteMoeAttention):
    """Granite 3.x's mixture of experts (GraniteMoe; GraniteMoeShared adds the shared MLP): llama.cpp's
    granitemoe, the experts fused as Granite 4.0 stores them, RoPE always, no SSM keys (as the converter's
    GraniteMoeModel writes it)."""

    hf_class, model_type, rope_always = "GraniteMoeForCausalLM", "granitemoe", True

    def variant(self, config: dict) -> Architecture:
        return self

    def kv_heads(self, hp: HParams) -> int:
        return hp.n_head_kv

    def add_metadata(self, w, hp: HParams) -> None:
        MoE.add_metadata(self, w, hp)
        Granite.add_metadata(self, w, hp)


class GraniteMoeShared(GraniteMoe):
    hf_class, model_type = "GraniteMoeSharedForCausalLM", "granitemoeshared"
