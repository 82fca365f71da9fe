"""Gemma 3n as llama.cpp's gemma3n runs it (convert_hf_to_gguf's Gemma3NModel): the AltUp projections
stored one tensor per extra stream, written as one 3-D tensor each; the per-layer embedding padded to the
vocabulary with copies of token 0's row, as transformers looks up the tokens after that table (the
converter pads zeros: the image and audio tokens would answer differently); norms stored
as they are (Gemma 3n's RMSNorm scales by weight, not 1 + weight); the feed-forward size and the sliding
window written per layer.

llama.cpp fixes what the released E2B and E4B models set and transformers reads from config.json (AltUp's
stream count and active stream, the LAuReL rank, the per-layer input width, activation sparsity in the first
10 layers, KV sharing from layer 20 on): a config that differs is refused, since the GGUF would answer
differently from the model that was checked."""

from __future__ import annotations

import re

import torch

from ...errors import UnsupportedError
from .arch import Gemma, Gemma3, HParams
from .vlm import VisionLanguage

_ALTUP = re.compile(r"^(?P<head>.*\.altup(_unembed)?_projections)\.(?P<index>\d+)\.weight$")
_KV_FROM = 20  # the layers from which llama.cpp's gemma3n reuses the KV of layer 18 (sliding) or 19 (global)
_SPARSE = 10  # the layers llama.cpp's gemma3n runs with activation sparsity (at the 95th percentile)
# what llama.cpp's gemma3n holds fixed, by config key (the released models' values)
_FIXED = {
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "laurel_rank": 64,
    "hidden_size_per_layer_input": 256,
    "altup_correct_scale": True,
    "hidden_activation": "gelu_pytorch_tanh",
}


class Gemma3n(Gemma3):
    """Gemma 3n's language model (Gemma3nForCausalLM)."""

    hf_class, model_type, gguf_arch = "Gemma3nForCausalLM", "gemma3n_text", "gemma3n"
    gemma_norm = False

    def check(self, config: dict, hp: HParams) -> None:
        Gemma.check(self, config, hp)  # (the layer pattern is written per layer: any pattern runs)
        fixed = {k: (config.get(k), v) for k, v in _FIXED.items() if config.get(k) != v}
        sparsity = [0.95 if i < _SPARSE else 0.0 for i in range(hp.n_layers)]
        if [float(s) for s in config.get("activation_sparsity_pattern") or []] != sparsity:
            fixed["activation_sparsity_pattern"] = (config.get("activation_sparsity_pattern"), sparsity)
        if not config.get("final_logit_softcapping"):
            fixed["final_logit_softcapping"] = (config.get("final_logit_softcapping"), "a number")
        if fixed:
            said = "; ".join(
                f"{k} is {have!r} where llama.cpp has {want!r}" for k, (have, want) in fixed.items()
            )
            raise UnsupportedError(
                f"llama.cpp's gemma3n architecture fixes what the released Gemma 3n models set: {said}; so the "
                "GGUF would not match."
            )
        self._check_kv_sharing(config, hp)

    def _check_kv_sharing(self, config: dict, hp: HParams) -> None:
        """transformers reuses, from layer n - num_kv_shared_layers on, the KV of the last earlier layer of
        the same type; llama.cpp from layer 20 on, that of layer 18 (sliding) or 19 (global)."""
        types = config.get("layer_types") or []
        first = hp.n_layers - int(config.get("num_kv_shared_layers") or 0)
        llama_cpp = min(_KV_FROM, hp.n_layers)
        same = first == llama_cpp and all(
            max(j for j in range(first) if types[j] == types[i])
            == (_KV_FROM - 2 if types[i] == "sliding_attention" else _KV_FROM - 1)
            for i in range(first, hp.n_layers)
        )
        if not same:
            raise UnsupportedError(
                f"this model shares attention keys and values from layer {first} on (num_kv_shared_layers "
                f"{config.get('num_kv_shared_layers')} of {hp.n_layers}); llama.cpp's gemma3n shares them from "
                f"layer {_KV_FROM} on, reusing layer {_KV_FROM - 2} (sliding) and {_KV_FROM - 1} (global), so "
                "the GGUF would not match."
            )

    def add_metadata(self, w, hp: HParams) -> None:
        super().add_metadata(w, hp)
        config = hp.config or {}
        w.add_altup_active_idx(int(config["altup_active_idx"]))
        w.add_altup_num_inputs(int(config["altup_num_inputs"]))
        w.add_embedding_length_per_layer_input(int(config["hidden_size_per_layer_input"]))
        w.add_shared_kv_layers(int(config.get("num_kv_shared_layers") or 0))
        normal = torch.distributions.Normal(0.0, 1.0)  # the share of activations kept, as a z-score
        sparsity = [float(s) for s in config["activation_sparsity_pattern"]]
        w.add_activation_sparsity_scale([normal.icdf(torch.tensor(s)).item() for s in sparsity])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])

    def stack_of(self, hf_name: str, hp: HParams) -> tuple[str, int, int] | None:
        m = _ALTUP.match(hf_name)
        if m is None:
            return None
        return f"{m['head']}.weight", int(m["index"]), int((hp.config or {})["altup_num_inputs"]) - 1

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if name.endswith("embed_tokens_per_layer.weight") and shape[0] < hp.vocab_size:
            return [(name, (hp.vocab_size, *shape[1:]))]  # rows for the tokens after the table
        if name.endswith("_scale"):  # AltUp's output scale, a weight named without the suffix
            return [(name + ".weight", shape)]
        return None

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        # the table's missing rows are written as copies of its first (encode_parts): transformers looks
        # the tokens after it up as token 0 (llama.cpp's converter pads zeros)
        return [t]


class Gemma3nVision(VisionLanguage, Gemma3n):
    """Gemma 3n E2B/E4B as released (Gemma3nForConditionalGeneration): its language model, without the
    vision and audio towers and their embedders."""

    hf_class, model_type = "Gemma3nForConditionalGeneration", "gemma3n"

    def text_name(self, hf_name: str) -> str | None:
        if any(p in hf_name for p in ("audio_tower.", "embed_vision.", "embed_audio.")):
            return None
        return super().text_name(hf_name)
