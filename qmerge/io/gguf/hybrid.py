"""Hybrids of attention and state-space (Mamba) layers as llama.cpp runs them: the SSM tensors reshaped
as its converter reshapes them (A from A_log, 1-D parameters as columns, the convolution squeezed, the
gated norm per group), and what the model's config scales folded into the weights."""

from __future__ import annotations

import itertools

import torch

from ...errors import UnsupportedError
from .arch import SILU, Architecture, HParams, activation_only
from .moe import MoE, Qwen2Moe


class FalconH1(Architecture):
    """Falcon-H1: attention and Mamba-2 in parallel in every layer (convert_hf_to_gguf's FalconH1Model). Its
    config's multipliers (attention, SSM, MLP, embedding, output) are folded into the weights, the SSM input
    projection's per segment, as llama.cpp's falcon-h1 holds them; Q/K rows are not permuted."""

    hf_class, model_type, gguf_arch, permute_qk = "FalconH1ForCausalLM", "falcon_h1", "falcon-h1", False
    own_output = True  # the output and the embedding are scaled apart
    merge_fp32 = True  # scaled after the merge: in fp32, then cast to the file's type

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        activation_only(config, "hidden_act", SILU, self.gguf_arch, "SiLU")
        d_ssm, d_head = ssm_int(config, "d_ssm"), ssm_int(config, "d_head")
        if d_ssm % d_head:
            raise UnsupportedError(f"mamba_d_ssm ({d_ssm}) is not a multiple of mamba_d_head ({d_head}).")

    def add_metadata(self, w, hp: HParams) -> None:
        config = hp.config or {}
        w.add_ssm_conv_kernel(int(config.get("mamba_d_conv") or 4))
        w.add_ssm_inner_size(ssm_int(config, "d_ssm"))
        w.add_ssm_state_size(ssm_int(config, "d_state"))
        w.add_ssm_time_step_rank(ssm_int(config, "d_ssm") // ssm_int(config, "d_head"))
        w.add_ssm_group_count(ssm_int(config, "n_groups"))

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        return mamba2_split(name, shape, ssm_int(hp.config or {}, "n_groups"))

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        return [mamba2_cut(name, t, ssm_int(hp.config or {}, "n_groups"))]

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        """The config's multipliers, by the projection they scale (the converter's order of tests)."""
        c = hp.config or {}
        for part, factors in (
            ("down_proj", lambda: [_list(c, "mlp_multipliers")[1]]),
            ("gate_proj", lambda: [_list(c, "mlp_multipliers")[0]]),
            ("k_proj", lambda: [_num(c, "key_multiplier"), _num(c, "attention_in_multiplier")]),
            ("q_proj", lambda: [_num(c, "attention_in_multiplier")]),
            ("v_proj", lambda: [_num(c, "attention_in_multiplier")]),
            ("o_proj", lambda: [_num(c, "attention_out_multiplier")]),
            ("out_proj", lambda: [_num(c, "ssm_out_multiplier")]),
            ("lm_head", lambda: [_num(c, "lm_head_multiplier")]),
            ("embed_tokens", lambda: [_num(c, "embedding_multiplier")]),
        ):
            if part in hf_name:
                for f in factors():  # one after another in fp32, as the converter multiplies
                    t = t.float() * f
                return t
        if "in_proj" in hf_name:
            return _scaled_segments(t.float() * _num(c, "ssm_in_multiplier"), c)
        return t


class Jamba(MoE):
    """Jamba: Mamba (selective SSM) layers and attention layers, experts in every other layer's feed-forward
    (convert_hf_to_gguf's JambaModel): A = -exp(A_log), the convolution squeezed, KV heads counted per layer
    (0 in the Mamba layers); no RoPE, Q/K rows not permuted; the router's weights not renormalized."""

    hf_class, model_type, gguf_arch, permute_qk = "JambaForCausalLM", "jamba", "jamba", False
    norm_topk, norm_key = False, None

    def text_name(self, hf_name: str) -> str | None:
        return hf_name.replace(".moe.", ".feed_forward.")  # (Mini-Jamba's name for its experts)

    def kv_heads(self, hp: HParams) -> list[int]:
        config = hp.config or {}
        offset, period = int(config.get("attn_layer_offset", 4)), int(config.get("attn_layer_period", 8))
        return [hp.n_head_kv if i >= offset and (i - offset) % period == 0 else 0 for i in range(hp.n_layers)]

    def add_metadata(self, w, hp: HParams) -> None:
        super().add_metadata(w, hp)
        config = hp.config or {}
        w.add_ssm_conv_kernel(int(config.get("mamba_d_conv") or 4))
        w.add_ssm_inner_size(int(config.get("mamba_expand") or 2) * hp.hidden)
        w.add_ssm_state_size(int(config.get("mamba_d_state") or 16))
        w.add_ssm_time_step_rank(int(config.get("mamba_dt_rank") or -(hp.hidden // -16)))

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if name.endswith(".mamba.conv1d.weight"):
            return [(name, tuple(d for d in shape if d != 1))]
        if name.endswith(".mamba.A_log"):
            return [(name, shape)]
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if name.endswith(".mamba.A_log"):
            return [-torch.exp(t.float())]
        return [t.squeeze()]


class Qwen3Next(Qwen2Moe):
    """Qwen3-Next: gated delta-net (linear attention) layers and gated full attention every
    full_attention_interval-th layer, routed experts (renormalized) beside a gated shared expert, RMSNorms
    by (1 + weight) (convert_hf_to_gguf's Qwen3NextModel): the linear attention's fused q/k/v/z projection
    regrouped into qkv and the output gate, A = -exp(A_log), the convolution squeezed, partial RoPE."""

    hf_class, model_type, gguf_arch = "Qwen3NextForCausalLM", "qwen3_next", "qwen3next"
    norm_topk, norm_key, partial_rotary = True, "norm_topk_prob", 0.25

    def text_name(self, hf_name: str) -> str | None:
        return None if hf_name.startswith("mtp.") else hf_name  # multi-token prediction: not run

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        if len(config.get("layer_types") or [None] * hp.n_layers) != hp.n_layers:
            raise UnsupportedError(f"layer_types does not name each of the {hp.n_layers} layers.")

    def add_metadata(self, w, hp: HParams) -> None:
        super().add_metadata(w, hp)
        c = hp.config or {}
        w.add_ssm_conv_kernel(int(c["linear_conv_kernel_dim"]))
        w.add_ssm_state_size(int(c["linear_key_head_dim"]))
        w.add_ssm_group_count(int(c["linear_num_key_heads"]))
        w.add_ssm_time_step_rank(int(c["linear_num_value_heads"]))
        w.add_ssm_inner_size(int(c["linear_value_head_dim"]) * int(c["linear_num_value_heads"]))
        if layer_types := c.get("layer_types"):
            w.add_array(
                f"{self.gguf_arch}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types]
            )
        w.add_full_attention_interval(int(c.get("full_attention_interval", 4)))

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        return t + 1 if one_plus_norm(hf_name) else t

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if pieces := delta_net_split(name, shape):
            return pieces
        if name.endswith(".linear_attn.in_proj_qkvz.weight"):
            block = name.split(".")[2]
            qkv, z = self._qkvz(hp)
            return [
                (f"blk.{block}.attn_qkv.weight", (qkv, shape[1])),
                (f"blk.{block}.attn_gate.weight", (z, shape[1])),
            ]
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if name.endswith(".linear_attn.A_log"):
            return [-torch.exp(t.float())]
        if not name.endswith(".linear_attn.in_proj_qkvz.weight"):
            return [t.squeeze()]
        c = hp.config or {}
        nk, hk, hv = (
            int(c["linear_num_key_heads"]),
            int(c["linear_key_head_dim"]),
            int(c["linear_value_head_dim"]),
        )
        vz = int(c["linear_num_value_heads"]) // nk * hv
        # stored per key head as [q, k, v, z]; llama.cpp holds all heads' q, then k, then v, and z apart
        q, k, v, z = t.reshape(nk, 2 * hk + 2 * vz, -1).split([hk, hk, vz, vz], dim=1)
        qkv = torch.cat([q.reshape(-1, t.shape[1]), k.reshape(-1, t.shape[1]), v.reshape(-1, t.shape[1])])
        return [qkv, z.reshape(-1, t.shape[1])]

    @staticmethod
    def _qkvz(hp: HParams) -> tuple[int, int]:
        c = hp.config or {}
        nk, nv = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
        hk, hv = int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"])
        return 2 * nk * hk + nv * hv, nv * hv


def delta_net_split(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
    """A gated delta-net's dt_bias (as the time step's bias), A_log and convolution (squeezed) as llama.cpp
    holds them (Qwen3-Next, Qwen3.5), or None."""
    if name.endswith(".linear_attn.dt_bias"):
        return [(name.replace(".dt_bias", ".dt_proj.bias"), shape)]
    if name.endswith((".linear_attn.A_log", ".linear_attn.conv1d.weight")):
        return [(name, tuple(d for d in shape if d != 1))]
    return None


def one_plus_norm(hf_name: str) -> bool:
    """An RMSNorm weight Qwen3-Next and Qwen3.5 scale by (1 + weight), which llama.cpp stores as weight + 1
    (not the gated delta-net's own norm, which is plain)."""
    return hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight")


def mamba2_split(name: str, shape: tuple[int, ...], groups: int) -> list[tuple[str, tuple[int, ...]]] | None:
    """A Mamba-2 mixer's tensors (`*.mamba.*`) as llama.cpp holds them (convert_hf_to_gguf's Mamba2Model):
    dt_bias as dt_proj's bias, A and D as columns (as Mamba-1 holds them), the convolution squeezed, the
    gated RMSNorm's weight per group; None for any other tensor."""
    if name.endswith(".mamba.dt_bias"):
        return [(name.replace(".dt_bias", ".dt_proj.bias"), shape)]
    if name.endswith((".mamba.A_log", ".mamba.D")):
        return [(name, (*shape, 1))]
    if name.endswith(".mamba.conv1d.weight"):
        return [(name, tuple(d for d in shape if d != 1))]
    if name.endswith(".mamba.norm.weight"):
        return [(name, (groups, shape[0] // groups))]
    return None


def mamba2_cut(name: str, t: torch.Tensor, groups: int) -> torch.Tensor:
    """The values of mamba2_split's tensor: A = -exp(A_log), the rest reshaped."""
    if name.endswith(".mamba.A_log"):
        t = -torch.exp(t.float())
    (_, shape), *_ = mamba2_split(name, tuple(t.shape), groups) or [(name, tuple(t.shape))]
    return t.reshape(shape)


def _scaled_segments(t: torch.Tensor, c: dict) -> torch.Tensor:
    """The SSM input projection's rows scaled per segment (z, x, B, C, dt) by ssm_multipliers."""
    d_ssm, gs = ssm_int(c, "d_ssm"), ssm_int(c, "n_groups") * ssm_int(c, "d_state")
    bounds = [0, d_ssm, 2 * d_ssm, 2 * d_ssm + gs, 2 * d_ssm + 2 * gs, t.shape[0]]
    scales = _list(c, "ssm_multipliers")
    t = t.clone()
    for (lo, hi), s in zip(itertools.pairwise(bounds), scales, strict=True):
        t[lo:hi] *= s
    return t


def ssm_int(config: dict, key: str) -> int:
    value = config.get(f"mamba_{key}")
    if type(value) is not int or value <= 0:
        raise UnsupportedError(
            f"config.json: mamba_{key} is {value!r}; GGUF export needs a positive integer."
        )
    return value


def _num(config: dict, key: str) -> float:
    value = config.get(key)
    return 1.0 if value is None else float(value)


def _list(config: dict, key: str) -> list[float]:
    return [float(v) for v in config.get(key) or [1.0] * (5 if key == "ssm_multipliers" else 2)]
