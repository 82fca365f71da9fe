"""Qwen3.5's language model as llama.cpp's qwen35 runs it (convert_hf_to_gguf's Qwen3_5TextModel): gated
delta-net (linear attention) layers and gated full attention, a dense MLP, RMSNorms by (1 + weight) but the
delta-net's own, interleaved M-RoPE on a quarter of each head.

As the converter writes it: A = -exp(A_log), dt_bias as the time step's bias, the convolution squeezed; where
there are more value heads than key heads, the value heads reordered from grouped by key head to tiled (the
V rows of in_proj_qkv, in_proj_z's and in_proj_a/b's rows, A and dt, the convolution's V channels,
out_proj's columns), as llama.cpp's broadcast expects them."""

from __future__ import annotations

import torch

from ...errors import UnsupportedError
from .arch import Architecture, HParams
from .hybrid import delta_net_split, one_plus_norm
from .vlm import VisionLanguage

DEFAULT_SECTIONS = [11, 11, 10, 0]  # transformers' default mrope_section, which llama.cpp needs written


class Qwen35(Architecture):
    """Qwen3.5's text model (`Qwen3_5ForCausalLM`)."""

    hf_class, model_type, gguf_arch, permute_qk = "Qwen3_5ForCausalLM", "qwen3_5_text", "qwen35", False
    partial_rotary = 0.25
    no_lora_gguf = (".linear_attn.",)  # reordered along their inputs too: a LoRA's A would need it

    def text_name(self, hf_name: str) -> str | None:
        return None if hf_name.startswith("mtp.") else hf_name  # multi-token prediction: not run (--no-mtp)

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        types = config.get("layer_types") or []
        if len(types) != hp.n_layers or set(types) - {"linear_attention", "full_attention"}:
            raise UnsupportedError(
                f"config.json's layer_types ({types}) do not name each of the {hp.n_layers} layers as "
                "linear_attention or full_attention, as llama.cpp's qwen35 reads them."
            )
        if 2 * sum(_sections(config)) > hp.rope_dims:
            raise UnsupportedError(
                f"the M-RoPE sections ({_sections(config)}) cover more than the {hp.rope_dims} rotated dimensions "
                "of each head; llama.cpp's qwen35 could not run it."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        c = hp.config or {}
        nk, nv = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
        w.add_ssm_conv_kernel(int(c["linear_conv_kernel_dim"]))
        w.add_ssm_state_size(int(c["linear_key_head_dim"]))
        w.add_ssm_group_count(nk)
        w.add_ssm_time_step_rank(nv)
        w.add_ssm_inner_size(int(c["linear_value_head_dim"]) * nv)
        w.add_array(
            f"{self.gguf_arch}.attention.recurrent_layers",
            [t == "linear_attention" for t in c["layer_types"]],
        )
        w.add_full_attention_interval(int(c.get("full_attention_interval") or 4))
        w.add_rope_dimension_sections([*_sections(c), 0, 0, 0, 0][:4])

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        return delta_net_split(name, shape)

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        return [-torch.exp(t.float()) if name.endswith(".A_log") else t.squeeze()]

    def transform(self, hf_name: str, t: torch.Tensor, hp: HParams) -> torch.Tensor:
        if one_plus_norm(hf_name):
            return t + 1
        if ".linear_attn." not in hf_name:
            return t
        c = hp.config or {}
        nk, nv = int(c["linear_num_key_heads"]), int(c["linear_num_value_heads"])
        if nk == nv:
            return t
        hk, hv = int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"])
        if ".in_proj_qkv." in hf_name or ".conv1d." in hf_name:  # the V rows (channels) after Q and K
            qk = 2 * nk * hk
            return torch.cat([t[:qk], _tiled(t[qk:], 0, nk, nv // nk, hv)])
        if ".in_proj_z." in hf_name:
            return _tiled(t, 0, nk, nv // nk, hv)
        if ".in_proj_a." in hf_name or ".in_proj_b." in hf_name or hf_name.endswith((".A_log", ".dt_bias")):
            return _tiled(t, 0, nk, nv // nk, 1)
        if ".out_proj." in hf_name:
            return _tiled(t, 1, nk, nv // nk, hv)
        return t


def _tiled(t: torch.Tensor, dim: int, nk: int, per_k: int, head: int) -> torch.Tensor:
    """Value heads grouped by key head ([k0 v0..v(r-1), k1 ...]) reordered to tiled ([k0 v0, k1 v0, ...])
    along `dim`."""
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], nk, per_k, head, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).contiguous().reshape(shape)


def _sections(config: dict) -> list[int]:
    """The M-RoPE sections transformers rotates by (its default where config.json names none)."""
    return list((config.get("rope_parameters") or {}).get("mrope_section") or DEFAULT_SECTIONS)


class Qwen35Vision(VisionLanguage, Qwen35):
    """Qwen3.5 as released (`Qwen3_5ForConditionalGeneration`): its language model (the vision tower left
    out; `--mmproj` does not write its projector yet)."""

    hf_class, model_type = "Qwen3_5ForConditionalGeneration", "qwen3_5"

    def text_name(self, hf_name: str) -> str | None:
        name = VisionLanguage.text_name(self, hf_name)
        return Qwen35.text_name(self, name) if name else None
