"""The architectures GGUF export writes, by the class name config.json's `architectures` gives."""

from __future__ import annotations

from ...errors import UnsupportedError
from .arch import Architecture, Gemma, Gemma2, Gemma3, HParams, Mistral, Phi3, Qwen2, Qwen3, read_hparams
from .dense import Cohere2, Glm4, Granite, Ministral3, Olmo2, SmolLM3
from .gemma3n import Gemma3n, Gemma3nVision
from .granite_hybrid import Bamba, GraniteHybrid, GraniteMoe, GraniteMoeShared
from .hybrid import FalconH1, Jamba, Qwen3Next
from .layernorm import GPT2, GPTNeoX, Phi2, StableLM, Starcoder2
from .moe import DeepseekV3, GptOss, Llama4, Mixtral, Olmoe, Qwen2Moe, Qwen3Moe
from .qwen35 import Qwen35, Qwen35Vision
from .vlm import (
    Gemma3Vision,
    Idefics3Vision,
    Llama4Vision,
    Llava,
    Mistral3Vision,
    Qwen2Vision,
    Qwen3Vision,
    Qwen3VLMoeVision,
    Qwen25Vision,
    SmolVLMVision,
)

ARCHITECTURES: dict[str, Architecture] = {
    a.hf_class: a
    for a in (
        Architecture(),
        Mistral(),
        Qwen2(),
        Qwen3(),
        Gemma(),
        Gemma2(),
        Gemma3(),
        Gemma3n(),
        Phi3(),
        Granite(),
        SmolLM3(),
        Olmo2(),
        Glm4(),
        Cohere2(),
        Ministral3(),
        FalconH1(),
        Jamba(),
        GraniteHybrid(),
        Bamba(),
        GraniteMoe(),
        GraniteMoeShared(),
        GPTNeoX(),
        GPT2(),
        Phi2(),
        StableLM(),
        Starcoder2(),
        Qwen3Next(),
        Qwen35(),
        Qwen35Vision(),
        Mixtral(),
        Qwen2Moe(),
        Qwen3Moe(),
        Olmoe(),
        GptOss(),
        Llama4(),
        DeepseekV3(),
        Gemma3Vision(),
        Gemma3nVision(),
        Idefics3Vision(),
        SmolVLMVision(),
        Llava(),
        Qwen2Vision(),
        Qwen25Vision(),
        Mistral3Vision(),
        Llama4Vision(),
        Qwen3Vision(),
        Qwen3VLMoeVision(),
    )
}


def architecture_of(config: dict) -> tuple[Architecture, HParams]:
    """The architecture record and hyperparameters of a config.json, or UnsupportedError."""
    archs = config.get("architectures") or []
    by_type = {a.model_type: name for name, a in ARCHITECTURES.items()}
    hf_arch = archs[0] if isinstance(archs, list) and archs else by_type.get(config.get("model_type"))
    if hf_arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"this model is {hf_arch or config.get('model_type')}, which qmerge does not write as GGUF (it "
            f"writes {len(ARCHITECTURES)} model classes, as llama.cpp's "
            f"{', '.join(dict.fromkeys(a.gguf_arch for a in ARCHITECTURES.values()))}). The route for it: "
            "export the merge in 16 bits "
            "(qmerge export ADAPTER --to bf16 -o MERGED), then convert it with llama.cpp's "
            "convert_hf_to_gguf.py MERGED (with --mmproj for a vision model's projector), and measure the "
            "GGUF with qmerge check ADAPTER --candidate FILE.gguf."
        )
    arch = ARCHITECTURES[hf_arch]
    params = arch.hf_params(text_config(config, arch.model_type))
    arch = arch.variant(params)
    hp = arch.adjust(read_hparams(params, arch))
    arch.check(params, hp)
    return arch, hp


def text_config(config: dict, model_type: str, lift: bool = True) -> dict:
    """config.json as transformers reads it (every default filled in), the text model's keys at the top
    level for a vision-language model (unless not `lift`), as llama.cpp's converter reads its
    hyperparameters."""
    from ..hf_classes import hf_config_of

    full = hf_config_of({"model_type": model_type, **config}).to_dict()
    if not lift or not full.get("text_config"):
        return full
    # whether the output layer is the embedding is the top-level config's say (transformers ties by it)
    tied = {"tie_word_embeddings": full["tie_word_embeddings"]} if "tie_word_embeddings" in full else {}
    return {**full, **full["text_config"], **tied}
