"""The vision projectors the mmproj GGUF is written for (mmproj.py's Projector), as llama.cpp's converter
keeps one class per vision model (Qwen's in qwen_vision.py), and their table."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ...errors import InputError, UnsupportedError
from .arch import permute_qk
from .mmproj import Projector, VisionParams, find, read_preprocessor, special_token_id
from .qwen_vision import Qwen2VLProjector, Qwen3VLProjector, Qwen25VLProjector


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

    def transform(self, name: str, t: torch.Tensor, vp: VisionParams) -> torch.Tensor:
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


class PixtralProjector(Projector):
    """Pixtral's vision encoder and the LLaVA-style projector (with Mistral 3's patch merger): Mistral Small
    3.1/3.2 and Ministral 3 (Mistral3ForConditionalGeneration), Pixtral 12B (LlavaForConditionalGeneration).
    Q/K rows permuted as llama.cpp's 2-D RoPE reads them, and the [IMG_BREAK] token's embedding (the row of
    the merged embedding) that llama.cpp puts between rows of image patches: llama.cpp 0.3.36 refuses a
    projector without it. (llama.cpp's converter finds it only in Mistral's own checkpoint format: from
    these checkpoints it writes a file mtmd cannot load; qmerge's has the row.)"""

    hf_classes = ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")
    projector_type = "pixtral"
    embedding = "embed_tokens.weight"
    prefixes = ("multi_modal_projector.", "vision_tower.", "vision_encoder.", "vision_language_adapter.")
    prefixes += ("patch_merger.", "pre_mm_projector_norm")

    def name(self, hf_name: str) -> str | None:
        if "language_model." in hf_name and hf_name.endswith(self.embedding):
            return self.embedding  # the text embedding, for the [IMG_BREAK] row
        if hf_name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):  # transformers 5's
            hf_name = hf_name.removeprefix("model.")
        return super().name(hf_name)

    def split(
        self, name: str, shape: tuple[int, ...], vp: VisionParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        import gguf

        if name == self.embedding:
            return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK], (shape[-1],))]
        return None

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]

    def check(self, config: dict) -> None:
        vision = config.get("vision_config") or {}
        if vision.get("model_type") != "pixtral":
            raise UnsupportedError(
                f"this model's vision tower is {vision.get('model_type')}; llama.cpp's converter writes the "
                "projector of LLaVA-style models over a Pixtral tower only (for CLIP towers llama.cpp keeps "
                "separate legacy tools), and so does qmerge. Export the merge in 16 bits (qmerge export "
                "ADAPTER --to bf16 -o MERGED) for llama.cpp's own LLaVA tools."
            )

    def read(self, config: dict, preprocessor: dict, tokenizer_dir: Path | None = None) -> VisionParams:
        vp = super().read(config, preprocessor, tokenizer_dir)
        token = special_token_id(tokenizer_dir, "[IMG_BREAK]") if tokenizer_dir else None
        if token is None:
            raise InputError(
                f"{tokenizer_dir}: the tokenizer has no [IMG_BREAK] token; Pixtral's projector needs its "
                "embedding. Use the tokenizer the model was released with."
            )
        eps = vp.vision.get("layer_norm_eps", 1e-5)
        return replace(vp, vision={**vp.vision, "layer_norm_eps": eps}, token_ids={"[IMG_BREAK]": token})

    def transform(self, name: str, t: torch.Tensor, vp: VisionParams) -> torch.Tensor:
        if name == self.embedding:
            return t[vp.token_ids["[IMG_BREAK]"]]
        if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            return permute_qk(t, int(find(vp.vision, ("num_attention_heads",), "head count")))
        return t

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        w.add_vision_attention_layernorm_eps(float(vp.vision["layer_norm_eps"]))
        act = vp.vision.get("hidden_act")
        if act not in ("silu", "gelu"):
            raise UnsupportedError(
                f"vision_config.hidden_act is {act!r}; llama.cpp runs Pixtral with SiLU or GELU only."
            )
        (w.add_vision_use_silu if act == "silu" else w.add_vision_use_gelu)(True)
        if vp.config.get("spatial_merge_size") is not None:
            w.add_vision_spatial_merge_size(int(vp.config["spatial_merge_size"]))


class Idefics3Projector(Projector):
    """SmolVLM's and Idefics3's SigLIP tower and pixel-shuffle connector (Idefics3ForConditionalGeneration,
    SmolVLM2's SmolVLMForConditionalGeneration)."""

    hf_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    projector_type = "idefics3"
    prefixes = ("model.vision_model.", "model.connector.")

    def forced_type(self, name: str, gguf_name: str, gguf_type: str):
        import gguf

        if ".embeddings." in name:
            return gguf.GGMLQuantizationType.F32
        return super().forced_type(name, gguf_name, gguf_type)

    def add_metadata(self, w, vp: VisionParams) -> None:
        super().add_metadata(w, vp)
        w.add_vision_attention_layernorm_eps(float(vp.vision.get("layer_norm_eps", 1e-5)))
        w.add_vision_projector_scale_factor(int(vp.config.get("scale_factor", 2)))
        w.add_vision_use_gelu(True)
        edge = (vp.preprocessor.get("size") or {}).get("longest_edge")  # the size images are resized to
        w.add_vision_preproc_image_size(int(edge or find(vp.vision, ("image_size",), "image size")))


PROJECTORS: dict[str, Projector] = {
    cls: p
    for p in (
        Gemma3Projector(),
        Qwen2VLProjector(),
        Qwen25VLProjector(),
        Qwen3VLProjector(),
        Llama4Projector(),
        PixtralProjector(),
        Idefics3Projector(),
    )
    for cls in p.hf_classes
}
DIRECT = ("v.patch_embd.weight.1",)  # a name split() gives that gguf-py's map does not hold


def projector_of(
    config: dict, base_dir: Path, tokenizer_dir: Path | None = None
) -> tuple[Projector, VisionParams]:
    """The projector record and its parameters for a checkpoint (its processor files in `base_dir`, its
    tokenizer in `tokenizer_dir`), or UnsupportedError with the route."""
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
    projector.check(full)
    return projector, projector.read(full, read_preprocessor(base_dir), tokenizer_dir)
