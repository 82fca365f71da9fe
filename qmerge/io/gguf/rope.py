"""RoPE scaling in GGUF: metadata keys and the extra F32 tensors llama.cpp reads it from, computed as
llama.cpp's convert_hf_to_gguf.py computes them."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...errors import InputError, UnsupportedError
from .arch import Architecture, HParams

# YaRN's parameters as transformers names them -> the GGUF writer's method (as convert_hf_to_gguf writes them)
_YARN = {
    "extrapolation_factor": "add_rope_scaling_yarn_ext_factor",
    "attention_factor": "add_rope_scaling_yarn_attn_factor",
    "beta_fast": "add_rope_scaling_yarn_beta_fast",
    "beta_slow": "add_rope_scaling_yarn_beta_slow",
}


def _kind(hp: HParams) -> str | None:
    s = hp.rope_scaling
    return s.get("rope_type", s.get("type")) if s else None


def add_rope_metadata(w, arch: Architecture, hp: HParams) -> None:
    """rope.scaling.* keys for linear, YaRN and Phi-3 longrope scaling (llama3 goes in rope_freqs)."""
    import gguf

    s, kind = hp.rope_scaling, _kind(hp)
    if not s:
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        for key, add in _YARN.items():  # those config.json sets (llama.cpp's defaults otherwise)
            if (value := s.get(key)) is not None:
                getattr(w, add)(float(value))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (see rope_tensors)
    elif kind in ("longrope", "su") and arch.gguf_arch == "phi3":
        # factors as rope_factors_long/short tensors (see rope_tensors); the attention factor as
        # transformers computes it (and convert_hf_to_gguf's Phi3MiniModel)
        attn = s.get("attention_factor")
        scale = hp.n_ctx / float(hp.orig_ctx or hp.n_ctx)
        if attn is None:
            attn = math.sqrt(1 + math.log(scale) / math.log(float(hp.orig_ctx))) if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(float(attn))
    else:
        raise UnsupportedError(
            f"RoPE scaling {kind!r} is not supported for GGUF export of {arch.hf_class} (linear, yarn and "
            "llama3 are, and longrope for Phi-3)."
        )


def rope_tensors(arch: Architecture, hp: HParams) -> list[tuple[str, np.ndarray]]:
    """Extra F32 tensors llama.cpp reads RoPE scaling from: Llama 3's rope_freqs, Phi-3's long/short
    factors (as convert_hf_to_gguf writes them)."""
    import gguf

    freqs = llama3_rope_freqs(hp)
    if freqs is not None:
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)]
    if arch.gguf_arch != "phi3" or _kind(hp) not in ("longrope", "su"):
        return []
    out = []
    for key, tensor in (
        ("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
        ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT),
    ):
        factors = hp.rope_scaling.get(key)
        if not factors or len(factors) * 2 != hp.rope_dims:
            raise InputError(
                f"config.json: Phi-3 longrope needs {key} with {hp.rope_dims // 2} values, got {len(factors or [])}."
            )
        out.append((gguf.TENSOR_NAMES[tensor] + ".weight", np.array(factors, dtype=np.float32)))
    return out


def llama3_rope_freqs(hp: HParams) -> np.ndarray | None:
    """The rope_freqs factors llama.cpp needs for Llama 3.1 style scaling (as convert_hf_to_gguf computes)."""
    if _kind(hp) != "llama3":
        return None
    s = hp.rope_scaling
    base, dim = hp.rope_theta, hp.head_dim
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
