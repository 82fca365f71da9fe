"""What transformers would do with a config, found on a meta-device model (no weights, no memory)."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UnsupportedError


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config warnings about the user's model are not qmerge's to print

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
        if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
            names.add(name + ".weight")
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


# Causal-LM families whose linear layers are transformers' Conv1D (weights stored [in, out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


@lru_cache(maxsize=8)
def _conv1d_weights(config_json: str) -> frozenset[str]:
    import json

    model = _meta_model(json.loads(config_json))
    return frozenset(n + ".weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D")


def conv1d_weights(config: dict) -> frozenset[str]:
    """Weights of transformers Conv1D modules ([in, out] on disk; bitsandbytes quantizes them transposed)."""
    import json

    if config.get("model_type") not in CONV1D_MODEL_TYPES:
        return frozenset()
    return _conv1d_weights(json.dumps(config, sort_keys=True))
