"""Qwen's vision transformers as llama.cpp's mtmd runs them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): records for
the mmproj GGUF (mmproj.py's Projector; the table is projectors.py's)."""

from __future__ import annotations

import itertools

import torch

from ...errors import InputError, UnsupportedError
from .mmproj import Projector, VisionParams


class Qwen2VLProjector(Projector):
    """Qwen2-VL's vision transformer and patch merger: fused qkv split, the 3-D patch convolution split
    into its two frames."""

    hf_classes = ("Qwen2VLForConditionalGeneration",)
    projector_type = "qwen2vl_merger"
    prefixes = ("visual.",)

    def name(self, hf_name: str) -> str | None:
        return super().name(hf_name.replace("model.visual.", "visual.", 1))

    def rename(self, vision: dict) -> dict:
        vision = {**vision, "image_size": vision.get("image_size", 560)}
        vision |= {"num_attention_heads": vision.get("num_heads"), "num_hidden_layers": vision.get("depth")}
        if "embed_dim" in vision:  # Qwen2-VL names the width embed_dim (the converter's reading)
            vision |= {"intermediate_size": vision.get("hidden_size"), "hidden_size": vision.get("embed_dim")}
        return vision

    def split(
        self, name: str, shape: tuple[int, ...], vp: VisionParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if ".qkv." in name:
            if shape[0] % 3:
                raise InputError(f"{name}: {shape[0]} rows are not three equal parts (q, k, v).")
            third = (shape[0] // 3, *shape[1:])
            return [(name.replace("qkv", part), third) for part in ("q", "k", "v")]
        return two_frames(name, shape)

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        if ".qkv." in name:
            return list(t.chunk(3, dim=0))
        return [t[:, :, 0], t[:, :, 1]] if t.dim() == 5 else [t]

    def forced_type(self, name: str, gguf_name: str, gguf_type: str):
        import gguf

        if ".position_embd." in gguf_name:
            return gguf.GGMLQuantizationType.F32
        return super().forced_type(name, gguf_name, gguf_type)

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        self.add_merger(w, vp)
        w.add_vision_attention_layernorm_eps(float(vp.config.get("rms_norm_eps", 1e-6)))

    def add_merger(self, w, vp: VisionParams) -> None:
        """Keys of the Qwen generation (Qwen2.5-VL's window attention)."""


class Qwen25VLProjector(Qwen2VLProjector):
    """Qwen2.5-VL: SwiGLU blocks, window attention with full attention every n_wa_pattern-th block."""

    hf_classes = ("Qwen2_5_VLForConditionalGeneration",)
    projector_type = "qwen2.5vl_merger"

    def add_merger(self, w, vp: VisionParams) -> None:
        w.add_vision_use_silu(True)
        full = list(vp.vision.get("fullatt_block_indexes") or [])
        if not full or any(b - a != full[0] + 1 for a, b in itertools.pairwise(full)):
            raise UnsupportedError(
                f"vision_config.fullatt_block_indexes is {full}; llama.cpp runs Qwen2.5-VL's vision tower with "
                "full attention in every n-th block (evenly spaced), so the projector would not match."
            )
        w.add_vision_n_wa_pattern(full[0] + 1)


def two_frames(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
    """Qwen's 3-D patch convolution over two frames as llama.cpp holds it: two 2-D ones (None: another
    tensor)."""
    import gguf

    if "patch_embed.proj.weight" not in name:
        return None
    if len(shape) != 5 or shape[2] != 2:
        raise UnsupportedError(
            f"{name}: a patch convolution over {shape[2] if len(shape) == 5 else '?'} frames; llama.cpp runs "
            "Qwen's vision towers over 2 (temporal_patch_size 2)."
        )
    patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
    frame = (shape[0], shape[1], *shape[3:])
    return [(patch, frame), (patch + ".1", frame)]


class Qwen3VLProjector(Projector):
    """Qwen3-VL's vision transformer: fused qkv kept, learned position embeddings, the patch merger, and
    the DeepStack mergers that hand features of some blocks to the language model's first layers."""

    hf_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    projector_type = "qwen3vl_merger"
    prefixes = ("visual.",)

    def name(self, hf_name: str) -> str | None:
        return super().name(hf_name.replace("model.visual.", "visual.", 1))

    def rename(self, vision: dict) -> dict:
        if "image_size" not in vision:  # from the position embeddings, as the converter computes it
            side = int(vision.get("num_position_embeddings", 2304) ** 0.5)
            vision = {**vision, "image_size": side * int(vision.get("patch_size", 16))}
        return vision | {
            "num_attention_heads": vision.get("num_heads"),
            "num_hidden_layers": vision.get("depth"),
        }

    def split(
        self, name: str, shape: tuple[int, ...], vp: VisionParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        import gguf

        T, tail = gguf.MODEL_TENSOR, name.split(".", 3)[-1]
        if name.startswith("visual.deepstack_merger_list."):
            index = int(name.split(".")[2])
            block = list(vp.vision.get("deepstack_visual_indexes") or [])[index]
            part, suffix = tail.split(".", 1)
            kind = {"norm": T.V_DS_NORM, "linear_fc1": T.V_DS_FC1, "linear_fc2": T.V_DS_FC2}[part]
            return [(gguf.TENSOR_NAMES[kind].format(bid=block) + "." + suffix, shape)]
        if name.startswith("visual.merger."):
            part, suffix = name.split(".", 3)[2:]
            if part == "norm":
                return [(gguf.TENSOR_NAMES[T.V_POST_NORM] + "." + suffix, shape)]
            layer = {"linear_fc1": 0, "linear_fc2": 2}[part]  # mm.0 and mm.2, as Qwen2-VL's merger
            return [(gguf.TENSOR_NAMES[T.V_MMPROJ].format(bid=layer) + "." + suffix, shape)]
        return two_frames(name, shape)

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        return [t[:, :, 0], t[:, :, 1]] if t.dim() == 5 else [t]

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        w.add_vision_use_gelu(True)
        if vp.vision.get("spatial_merge_size") is not None:
            w.add_vision_spatial_merge_size(int(vp.vision["spatial_merge_size"]))
        text = vp.config.get("text_config") or {}
        w.add_vision_attention_layernorm_eps(float(text.get("rms_norm_eps", 1e-6)))
        deepstack = set(vp.vision.get("deepstack_visual_indexes") or [])
        if vp.n_blocks:
            w.add_vision_is_deepstack_layers([i in deepstack for i in range(vp.n_blocks)])
