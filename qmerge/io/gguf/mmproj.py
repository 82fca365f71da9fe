"""The image side of a vision-language checkpoint as llama.cpp's multimodal library (mtmd) loads it: the
`mmproj` GGUF (architecture `clip`) beside the text GGUF. One record per projector, as llama.cpp's
converter keeps one class per vision model: which stored tensors are the image side, the names they take
(gguf-py's MMPROJ tensor map), how they change, the GGML type each is held in, and the `clip.*` keys."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import InputError, UnsupportedError


@dataclass(frozen=True)
class VisionParams:
    """What an mmproj file needs from the checkpoint: its config as transformers parses it (`config`), the
    vision config with llama.cpp's names filled in (`vision`), and the image processor's settings."""

    config: dict
    vision: dict
    preprocessor: dict
    n_blocks: int
    n_embd_text: int


def _find(obj: dict, keys: tuple[str, ...], what: str) -> object:
    """The first of `keys` the vision config sets (as the converter's find_vparam), or InputError."""
    for k in keys:
        if obj.get(k) is not None:
            return obj[k]
    raise InputError(f"config.json: the vision config has no {what} (looked for {', '.join(keys)}).")


def read_preprocessor(base_dir: Path) -> dict:
    """preprocessor_config.json and processor_config.json (its image_processor lifted), as the converter
    merges them; InputError when neither gives the image mean and standard deviation."""
    merged: dict = {}
    for name, inner in (
        ("preprocessor_config.json", "media_proc_cfg"),
        ("processor_config.json", "image_processor"),
    ):
        path = base_dir / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not readable JSON ({e}); fix or remove it.") from e
            merged |= {**cfg, **(cfg.get(inner) or {})}
    if not (merged.get("image_mean") and merged.get("image_std")):
        raise InputError(
            f"{base_dir}: no image_mean / image_std in preprocessor_config.json or processor_config.json; the "
            "vision projector needs the image processor's normalisation. Copy the processor files of the base "
            "model's release into the base folder."
        )
    return merged


class Projector:
    """A vision tower and projector as llama.cpp's mtmd runs them (clip.projector_type)."""

    hf_classes: tuple[str, ...] = ()
    projector_type = ""  # a gguf.VisionProjectorType value
    prefixes: tuple[str, ...] = ()  # stored names (after name()) that belong to the image side

    def name(self, hf_name: str) -> str | None:
        """The stored tensor's name as the converter reads it (one layout for every checkpoint), or None for
        a tensor of the language model."""
        return hf_name if hf_name.startswith(self.prefixes) else None

    def read(self, config: dict, preprocessor: dict) -> VisionParams:
        vision = dict(config.get("vision_config") or {})
        if not vision:
            raise InputError("config.json has no vision_config: this checkpoint has no vision tower.")
        text = {**config, **(config.get("text_config") or {})}
        vision = self.rename(vision)
        n_blocks = int(_find(vision, ("num_hidden_layers", "depth", "layers"), "number of layers"))
        return VisionParams(config, vision, preprocessor, n_blocks, int(text["hidden_size"]))

    def rename(self, vision: dict) -> dict:
        """The vision config with the keys llama.cpp's converter reads under its own names."""
        return vision

    def split(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        """The tensors a stored tensor becomes (names before mapping, or GGUF names in `DIRECT`), or None."""
        return None

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError(name)

    def transform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def forced_type(self, name: str, gguf_name: str, gguf_type: str):
        """The GGML type the converter forces on this tensor whatever the file's type, or None."""
        import gguf

        T = gguf.GGMLQuantizationType
        if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name:
            return T.F16 if gguf_type == "f16" else T.F32
        return None

    def add_metadata(self, w, vp: VisionParams) -> None:
        """The clip.* keys every projector has, in the converter's order; subclasses add their own."""
        v = vp.vision
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(vp.n_embd_text)
        w.add_vision_image_size(int(_find(v, ("image_size",), "image size")))
        w.add_vision_patch_size(int(_find(v, ("patch_size",), "patch size")))
        w.add_vision_embedding_length(int(_find(v, ("hidden_size", "width"), "hidden size")))
        w.add_vision_feed_forward_length(int(_find(v, ("intermediate_size",), "feed-forward size")))
        w.add_vision_block_count(vp.n_blocks)
        w.add_vision_head_count(int(_find(v, ("num_attention_heads", "num_heads", "heads"), "head count")))
        w.add_vision_image_mean([float(x) for x in vp.preprocessor["image_mean"]])
        w.add_vision_image_std([float(x) for x in vp.preprocessor["image_std"]])
        w.add_clip_projector_type(self.projector_type)


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

    def split(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        import gguf

        if ".qkv." in name:
            if shape[0] % 3:
                raise InputError(f"{name}: {shape[0]} rows are not three equal parts (q, k, v).")
            third = (shape[0] // 3, *shape[1:])
            return [(name.replace("qkv", part), third) for part in ("q", "k", "v")]
        if "patch_embed.proj.weight" in name:
            if len(shape) != 5 or shape[2] != 2:
                raise UnsupportedError(
                    f"{name}: a patch convolution over {shape[2] if len(shape) == 5 else '?'} frames; llama.cpp "
                    "runs Qwen2-VL's over 2 (temporal_patch_size 2)."
                )
            patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
            frame = (shape[0], shape[1], *shape[3:])
            return [(patch, frame), (patch + ".1", frame)]
        return None

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        if ".qkv." in name:
            return list(t.chunk(3, dim=0))
        return [t[:, :, 0], t[:, :, 1]]

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


PROJECTORS: dict[str, Projector] = {
    cls: p for p in (Gemma3Projector(), Qwen2VLProjector(), Qwen25VLProjector()) for cls in p.hf_classes
}
DIRECT = ("v.patch_embd.weight", "v.patch_embd.weight.1")  # names split() gives already as GGUF names


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
