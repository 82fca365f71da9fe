"""Vision-language models as llama.cpp runs their language model: the text GGUF of a checkpoint that holds a
vision tower too. Tensor names lose their `language_model.` part (both layouts transformers saves:
`model.language_model.*` and `language_model.model.*`) and the vision tower and projector are left out, as
llama.cpp's converter does; the hyperparameters are the text config's (families.text_config). The image
side, llama.cpp's mmproj file, is another file (mmproj.py, written with export mmproj=)."""

from __future__ import annotations

import torch

from ...errors import UnsupportedError
from .arch import Architecture, Gemma3, HParams, Qwen2, Qwen3
from .dense import Ministral3
from .moe import Llama4, Qwen3Moe

# parts of a tensor name that mark the image side (vision tower, projector) of a vision-language model
_VISION = ("vision_tower.", "vision_model.", "visual.", "multi_modal_projector.", "mm_projector.")
MMPROJ_ROUTE = (
    "this is a vision-language model: the GGUF holds its language model (text in, text out); for images "
    "llama.cpp also needs the vision projector (mmproj): add --mmproj FILE to write it too (Gemma 3, "
    "Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Llama 4, Mistral 3, Pixtral, SmolVLM and Idefics3), or, for other models, export the "
    "merge in 16 bits (qmerge export ADAPTER --to bf16 -o MERGED) and run llama.cpp's convert_hf_to_gguf.py "
    "MERGED --mmproj."
)


def note_text_only(arch: Architecture, source) -> None:
    """Say, once, that a vision-language model's GGUF holds its language model only (unless the source's
    projector is written beside it: export mmproj=)."""
    if arch.vision and getattr(source, "mmproj", None) is None and MMPROJ_ROUTE not in source.warnings:
        source.warnings.append(MMPROJ_ROUTE)


class VisionLanguage(Architecture):
    """The language model of a vision-language checkpoint."""

    vision = True

    def text_name(self, hf_name: str) -> str | None:
        """The name the text model's tensor has in a text-only checkpoint, or None for the image side."""
        if any(part in hf_name for part in _VISION):
            return None
        return hf_name.replace("language_model.", "")


class Gemma3Vision(VisionLanguage, Gemma3):
    """Gemma 3 4B/12B/27B (Gemma3ForConditionalGeneration): llama.cpp's gemma3 text model."""

    hf_class, model_type = "Gemma3ForConditionalGeneration", "gemma3"


class Llava(VisionLanguage):
    """LLaVA with a Llama or Mistral language model: llama.cpp's llama (Q/K rows permuted)."""

    hf_class, model_type = "LlavaForConditionalGeneration", "llava"
    text_types: tuple[str, ...] = ("llama", "mistral")  # the language models this record writes

    def check(self, config: dict, hp: HParams) -> None:
        super().check(config, hp)
        text = (config.get("text_config") or {}).get("model_type")
        if text not in self.text_types:
            raise UnsupportedError(
                f"this {self.model_type} model's language model is {text}; qmerge writes its GGUF over "
                f"{' or '.join(self.text_types)}. The route: export the merge in 16 bits (qmerge export ADAPTER "
                "--to bf16 -o MERGED) and convert it with llama.cpp's convert_hf_to_gguf.py MERGED."
            )


class Idefics3Vision(Llava):
    """SmolVLM and Idefics3 (Idefics3ForConditionalGeneration): their Llama language model (`text_model.`)
    as llama.cpp's llama, without the vision tower and the connector. (llama.cpp's converter reads it only
    from the text model saved alone; the names are the same.)"""

    hf_class, model_type = "Idefics3ForConditionalGeneration", "idefics3"
    text_types = ("llama",)

    def text_name(self, hf_name: str) -> str | None:
        name = None if "connector." in hf_name else super().text_name(hf_name)
        return name.replace("text_model.", "") if name else None


class SmolVLMVision(Idefics3Vision):
    """SmolVLM2 (SmolVLMForConditionalGeneration): Idefics3's layout."""

    hf_class, model_type = "SmolVLMForConditionalGeneration", "smolvlm"


class Qwen2Vision(VisionLanguage, Qwen2):
    """Qwen2-VL and Qwen2.5-VL: llama.cpp's qwen2vl, multimodal RoPE sections written from mrope_section."""

    hf_class, model_type, gguf_arch = "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2vl"

    def add_metadata(self, w, hp: HParams) -> None:
        add_mrope_sections(w, hp)


def add_mrope_sections(w, hp: HParams) -> None:
    """The multimodal RoPE sections (time, height, width, extra), from mrope_section."""
    config = hp.config or {}
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if sections := list(rope.get("mrope_section") or []):
        w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])


class Qwen25Vision(Qwen2Vision):
    hf_class, model_type = "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"


class Mistral3Vision(Llava, Ministral3):
    """Mistral Small 3.1/3.2 and Ministral 3 with images (Mistral3ForConditionalGeneration): llama.cpp's
    mistral3 text model (Mistral 4's MoE language model is refused)."""

    hf_class, model_type, gguf_arch = "Mistral3ForConditionalGeneration", "mistral3", "mistral3"
    text_types = ("mistral", "ministral3")


class Llama4Vision(VisionLanguage, Llama4):
    """Llama 4 Scout and Maverick as published (Llama4ForConditionalGeneration): llama.cpp's llama4."""

    hf_class, model_type = "Llama4ForConditionalGeneration", "llama4"


class Qwen3Vision(VisionLanguage, Qwen3):
    """Qwen3-VL: llama.cpp's qwen3vl (interleaved multimodal RoPE), with the count of layers that take
    DeepStack visual features (none with text alone)."""

    hf_class, model_type, gguf_arch = "Qwen3VLForConditionalGeneration", "qwen3_vl", "qwen3vl"

    def add_metadata(self, w, hp: HParams) -> None:
        add_mrope_sections(w, hp)
        vision = (hp.config or {}).get("vision_config") or {}
        w.add_num_deepstack_layers(len(vision.get("deepstack_visual_indexes") or []))


class Qwen3VLMoeVision(VisionLanguage, Qwen3Moe):
    """Qwen3-VL-MoE (Qwen3-VL-30B-A3B, -235B-A22B): llama.cpp's qwen3vlmoe, its experts stored fused and
    split as Llama 4's (gate/up halves, transposed), the chosen experts' weights always renormalized (the
    model's router does it whatever norm_topk_prob says)."""

    hf_class, model_type, gguf_arch, norm_key = (
        "Qwen3VLMoeForConditionalGeneration",
        "qwen3_vl_moe",
        "qwen3vlmoe",
        None,
    )

    def add_metadata(self, w, hp: HParams) -> None:
        super().add_metadata(w, hp)
        Qwen3Vision.add_metadata(self, w, hp)

    def split(
        self, name: str, shape: tuple[int, ...], hp: HParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        head, experts, ff = name.rsplit(".", 1)[0], shape[0], int(hp.n_ff_exp or 0)
        self._released(name, shape, hp)  # (refuses a layout the sizes cannot tell)
        if name.endswith("gate_up_proj"):
            return [(f"{head}.{p}.weight", (experts, ff, hp.hidden)) for p in ("gate_proj", "up_proj")]
        return [(f"{head}.down_proj.weight", (experts, hp.hidden, ff))]

    def cut(self, name: str, t: torch.Tensor, hp: HParams) -> list[torch.Tensor]:
        if self._released(
            name, tuple(t.shape), hp
        ):  # [experts, in, out] as released: llama.cpp's is [out, in]
            t = t.transpose(-1, -2)
        return list(t.chunk(2, dim=-2)) if name.endswith("experts.gate_up_proj") else [t]

    @staticmethod
    def _released(name: str, shape: tuple[int, ...], hp: HParams) -> bool:
        """Whether fused experts are stored as Qwen releases them, [experts, in, out] (True), or as
        transformers 5 saves them, [experts, out, in] (False); UnsupportedError where the sizes cannot tell."""
        inputs = hp.hidden if name.endswith("gate_up_proj") else int(hp.n_ff_exp or 0)
        outputs = 2 * int(hp.n_ff_exp or 0) if name.endswith("gate_up_proj") else hp.hidden
        if inputs == outputs or {shape[1], shape[2]} != {inputs, outputs}:
            raise UnsupportedError(
                f"{name} is {list(shape)}: qmerge cannot tell which way its experts are stored (hidden_size "
                f"{hp.hidden}, moe_intermediate_size {hp.n_ff_exp}); convert the bf16 merge with llama.cpp's "
                "convert_hf_to_gguf.py."
            )
        return shape[1] == inputs
