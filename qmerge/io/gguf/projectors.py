"""The vision projectors the mmproj GGUF is written for (mmproj.py's Projector), as llama.cpp's converter
keeps one class per vision model, and their table."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ...errors import InputError, UnsupportedError
from .mmproj import Projector, VisionParams, find, read_preprocessor


class Gemma3Projector(Projector):
    """Gemma 3's SigLIP tower and its pooling projector (Gemma3ForConditionalGeneration)."""

    hf_classes = ("Gemma3ForConditionalGeneration",)
    projector_type = "gemma3"
    prefixes = ("multi_modal_projector.", "vision_tower.", "multimodal_projector.", "vision_model.")

    def name(self, hf_name: str) -> str | None:
        hf_name = hf_name.removeprefix("model.")
        if hf_name.startswith("vision_tower.") and not hf_name.startswith("vision_tower.vision_model."):
            # transformers 5 saves the tower without SigLIP's `vision_model.` level; releases have it
            hf_name = "vision_tower.vision_model." + hf_name.removeprefix("vision_tower.")
        if not hf_name.startswith(self.prefixes) or "vision_model.head." in hf_name:
            return None
        return hf_name.replace("_weight", ".weight")  # mm_input_projection_weight, a bare parameter

    def transform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        # the projector's RMSNorm scales by (1 + weight), llama.cpp's by weight (SigLIP's norms are LayerNorms)
        return t + 1 if "soft_emb_norm.weight" in name else t

    def forced_type(self, name: str, gguf_name: str, gguf_type: str):
        import gguf

        if "input_projection" in name:
            return gguf.GGMLQuantizationType.F16
        if ".embeddings." in name:
            return gguf.GGMLQuantizationType.F32
        return super().forced_type(name, gguf_name, gguf_type)

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        w.add_vision_attention_layernorm_eps(float(vp.vision.get("layer_norm_eps", 1e-6)))
        w.add_vision_use_gelu(True)
        tokens = int(vp.preprocessor.get("image_seq_length", 256))
        per_side = int(vp.vision["image_size"]) // int(vp.vision["patch_size"])
        scale = per_side // int(tokens**0.5)
        if scale > 0 and scale != 4:  # llama.cpp's default is 4 (Gemma 3's 896-pixel images, 256 tokens)
            w.add_vision_projector_scale_factor(scale)


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

    hf_classes = ("Qwen3VLForConditionalGeneration",)
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


class Llama4Projector(Projector):
    """Llama 4's vision encoder, pixel-shuffle adapter and projection (Llama4ForConditionalGeneration)."""

    hf_classes = ("Llama4ForConditionalGeneration",)
    projector_type = "llama4"
    prefixes = ("vision_model.", "multi_modal_projector.")

    def name(self, hf_name: str) -> str | None:
        name = super().name(hf_name.removeprefix("model."))
        if name and "positional_embedding_vlm" in name and ".weight" not in name:
            name += ".weight"  # a bare parameter
        return name

    def split(
        self, name: str, shape: tuple[int, ...], vp: VisionParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        import gguf

        if "multi_modal_projector.linear_1" in name:  # one fully connected layer, whatever its name says
            return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_FC] + ".weight", shape)]
        return None

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        v = vp.vision
        if v.get("hidden_act") != "gelu":
            raise UnsupportedError(
                f"vision_config.hidden_act is {v.get('hidden_act')!r}; llama.cpp runs Llama 4's vision encoder "
                "with GELU, so the projector would not match."
            )
        w.add_vision_attention_layernorm_eps(float(find(v, ("norm_eps",), "normalisation epsilon")))
        w.add_vision_projector_scale_factor(
            int(1.0 / float(find(v, ("pixel_shuffle_ratio",), "pixel shuffle")))
        )
        w.add_vision_use_gelu(True)


PROJECTORS: dict[str, Projector] = {
    cls: p
    for p in (
        Gemma3Projector(),
        Qwen2VLProjector(),
        Qwen25VLProjector(),
        Qwen3VLProjector(),
        Llama4Projector(),
    )
    for cls in p.hf_classes
}
DIRECT = ("v.patch_embd.weight.1",)  # a name split() gives that gguf-py's map does not hold


def projector_of(config: dict, base_dir: Path) -> tuple[Projector, VisionParams]:
    """The projector record and its parameters for a checkpoint, or UnsupportedError with the route."""
    from .families import text_config

    if not config.get("vision_config"):
        raise UnsupportedError(
            "this model has no vision tower (config.json has no vision_config): a vision projector (mmproj) "
            "belongs to a vision-language model; export the GGUF without --mmproj."
        )
    archs = config.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
    if hf_arch not in PROJECTORS:
        raise UnsupportedError(
            f"this model is {hf_arch}, whose vision projector qmerge does not write (it writes "
            f"{', '.join(sorted(PROJECTORS))}). The route: export the merge in 16 bits (qmerge export ADAPTER "
            "--to bf16 -o MERGED), then run llama.cpp's convert_hf_to_gguf.py MERGED --mmproj."
        )
    projector = PROJECTORS[hf_arch]
    full = text_config(config, str(config.get("model_type")), lift=False)
    return projector, projector.read(full, read_preprocessor(base_dir))
