"""What transformers would do with a config, found on a meta-device model (no weights, no memory)."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UnsupportedError


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UnsupportedError("config.json has no model_type; qmerge cannot tell the architecture.")
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError) as e:
        raise UnsupportedError(
            f"model_type {model_type!r} is not known to the installed transformers ({e})."
        ) from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@lru_cache(maxsize=8)
def _quantized_linears(config_json: str, skip_modules: tuple[str, ...] | None) -> frozenset[str]:
    import json

    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _meta_model(json.loads(config_json))
    not_convert = HfQuantizer.get_modules_to_not_convert(
        model, list(skip_modules) if skip_modules is not None else None, model._keep_in_fp32_modules
    )
    names = set()
    for name, module in model.named_modules():
        if not should_convert_module(name, not_convert):
            continue
        if type(module) is nn.Linear:
            names.add(name + ".weight")
        elif type(module).__name__ == "Conv1D":
            raise UnsupportedError(
                f"module {name} is a Conv1D (GPT-2 style); reproducing its 4-bit weights from a 16-bit base is "
                "not supported. Pass a base saved in bitsandbytes 4-bit form."
            )
    return frozenset(names)


def quantized_linears(config: dict, skip_modules: list[str] | None = None) -> frozenset[str]:
    """Weight names that transformers replaces with bnb Linear4bit when it loads `config` in 4-bit.

    Same rule as transformers' Bnb4BitHfQuantizer: every nn.Linear except the output embedding, tied
    weights, the last module, llm_int8_skip_modules and the model's _keep_in_fp32_modules.
    """
    import json

    return _quantized_linears(
        json.dumps(config, sort_keys=True), tuple(skip_modules) if skip_modules else None
    )


@lru_cache(maxsize=8)
def _tied_weights(config_json: str) -> tuple[tuple[str, str], ...]:
    import json

    model = _meta_model(json.loads(config_json))
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return tuple(sorted((str(k), str(v)) for k, v in dict(tied).items()))


def tied_weights(config: dict) -> dict[str, str]:
    """{tied weight: the weight it shares storage with}, e.g. {"lm_head.weight": "model.embed_tokens.weight"},
    as transformers ties them for `config` (empty when nothing is tied)."""
    import json

    return dict(_tied_weights(json.dumps(config, sort_keys=True)))
