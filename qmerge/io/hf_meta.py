"""What transformers would do with a config, found on a meta-device model (no weights, no memory).

One meta model per config (cached) answers every question: which linears bitsandbytes quantizes at load
time, which weights are tied, which are GPT-2 style Conv1D, and the shape of every tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import InputError, QmergeError
from .hf_classes import build_model, hf_config_of

if TYPE_CHECKING:
    import torch

# Causal-LM families whose linear layers are transformers' Conv1D (weights stored [in, out]).
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


def _key(config: dict) -> str:
    return json.dumps(
        {k: v for k, v in config.items() if k != "quantization_config"}, sort_keys=True, default=str
    )


@lru_cache(maxsize=4)
def _meta_model(config_json: str):
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config warnings about the user's model are not qmerge's to print
    config = json.loads(config_json)
    hf_config = hf_config_of(config)
    try:
        with torch.device("meta"):
            return build_model(config, hf_config)
    except QmergeError:
        raise
    except ImportError as e:  # a package the model's class needs (Gemma 3n's vision tower: timm, pillow)
        import re

        needs = list(dict.fromkeys(re.findall(r"`pip install ([\w.\-]+)`", str(e)))) or [str(e).strip()]
        raise InputError(
            f"transformers needs {', '.join(needs)} to build a {config.get('model_type')} model, and this "
            f"machine lacks {'them' if len(needs) > 1 else 'it'}: pip install {' '.join(needs)}, then run again."
        ) from e
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"config.json: transformers cannot build a {config.get('model_type')} model from it "
            f"({type(e).__name__}: {e})."
        ) from e


def meta_model(config: dict):
    """The model transformers builds from `config`, on the meta device (cached per config)."""
    return _meta_model(_key(config))


class _Untied:
    """The model as from_pretrained hands it to the quantizer: its weights not tied yet, so that the
    "last module" transformers keeps in 16 bits is the last registered (the output layer of a tied model,
    not whatever precedes it: Gemma 3n's last altup projection is quantized)."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def named_parameters(self, *args, **kwargs):
        return self._model.named_parameters(remove_duplicate=False)


@lru_cache(maxsize=8)
def _quantized_linears(config_json: str, skip_modules: tuple[str, ...] | None) -> frozenset[str]:
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _meta_model(config_json)
    not_convert = HfQuantizer.get_modules_to_not_convert(
        _Untied(model), list(skip_modules) if skip_modules is not None else None, model._keep_in_fp32_modules
    )
    names = set()
    for name, module in model.named_modules():
        if not should_convert_module(name, not_convert):
            continue
        if type(module) is nn.Linear or type(module).__name__ == "Conv1D":
            names.add(name + ".weight")
    # under the names a checkpoint stores them too (a VLM saved in its older layout: model.layers.* for
    # the model's model.language_model.layers.*)
    saved = dict(_checkpoint_names(config_json))
    return frozenset(names | {saved[n] for n in names if n in saved})


def quantized_linears(config: dict, skip_modules: list[str] | None = None) -> frozenset[str]:
    """Weight names that transformers replaces with bnb Linear4bit when it loads `config` in 4-bit.

    Same rule as transformers' Bnb4BitHfQuantizer: every nn.Linear except the output embedding, tied
    weights, the last module, llm_int8_skip_modules and the model's _keep_in_fp32_modules.
    """
    return _quantized_linears(_key(config), tuple(skip_modules) if skip_modules else None)


def tied_weights(config: dict) -> dict[str, str]:
    """{tied weight: the weight it shares storage with}, e.g. {"lm_head.weight": "model.embed_tokens.weight"},
    as transformers ties them for `config` (empty when nothing is tied)."""
    tied = getattr(meta_model(config), "all_tied_weights_keys", None) or {}
    return {str(k): str(v) for k, v in dict(tied).items()}


def conv1d_weights(config: dict) -> frozenset[str]:
    """Weights of transformers Conv1D modules ([in, out] on disk; bitsandbytes quantizes them transposed)."""
    if config.get("model_type") not in CONV1D_MODEL_TYPES:
        return frozenset()
    return frozenset(
        n + ".weight" for n, m in meta_model(config).named_modules() if type(m).__name__ == "Conv1D"
    )


@lru_cache(maxsize=4)
def _reverted(config_json: str) -> tuple[dict, dict | None]:
    """(the meta model's state dict, what save_pretrained would write for it: transformers' own
    revert_weight_conversion, or None where it cannot run on meta tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = _meta_model(config_json)
    state = model.state_dict()
    try:
        return state, revert_weight_conversion(model, dict(state))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on meta tensors
        return state, None


@lru_cache(maxsize=4)
def _checkpoint_names(config_json: str) -> tuple[tuple[str, str], ...]:
    state, saved = _reverted(config_json)
    if saved is None:  # names as the model has them
        return tuple((k, k) for k in state)
    by_id = {id(t): k for k, t in state.items()}
    return tuple((by_id.get(id(t), k), k) for k, t in saved.items())


@lru_cache(maxsize=4)
def _split(config_json: str) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    """(model tensors transformers 5 builds from several checkpoint tensors at load time, e.g. a MoE
    layer's per-expert linears fused into one 3-D parameter; (checkpoint name, shape) of those pieces)."""
    state, saved = _reverted(config_json)
    if saved is None:
        return (), ()
    kept = {id(t) for t in saved.values()}
    ids = {id(t) for t in state.values()}
    fused = tuple(k for k, t in state.items() if id(t) not in kept and k not in saved)
    pieces = tuple((k, tuple(t.shape)) for k, t in saved.items() if id(t) not in ids and k not in state)
    return fused, pieces


@lru_cache(maxsize=4)
def _converters(config_json: str):
    """transformers' own load-time conversions for the config's model: (renamings, converters), as
    from_pretrained applies them to a checkpoint written by save_pretrained."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = [
        t
        for t in get_model_conversion_mapping(_meta_model(config_json), add_legacy=False)
        if not isinstance(t, PrefixChange)
    ]
    return (
        [t for t in transforms if isinstance(t, WeightRenaming)],
        [t for t in transforms if isinstance(t, WeightConverter)],
    )


@lru_cache(maxsize=4)
def _fused_sources(config_json: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(model tensor, the checkpoint tensors transformers builds it from, in load order) for every tensor
    built from several (the pieces _split finds, grouped as from_pretrained groups them)."""
    from transformers.core_model_loading import apply_converters, apply_renamings, dot_natural_key

    renamings, converters = _converters(config_json)
    groups: dict[str, list[str]] = {}
    for piece, _ in sorted(_split(config_json)[1], key=lambda kv: dot_natural_key(kv[0])):
        name, pattern = apply_converters(apply_renamings(piece, renamings), converters)
        if pattern is not None:
            groups.setdefault(name, []).append(piece)
    return tuple((name, tuple(pieces)) for name, pieces in groups.items())


def fused_at_load(config: dict) -> dict[str, tuple[str, ...]]:
    """{model tensor: the checkpoint tensors transformers builds it from when it loads `config`} for the
    tensors built from several (none for most models; MoE experts fused into 3-D parameters in
    transformers 5)."""
    return dict(_fused_sources(_key(config)))


def fuse(config: dict, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Model tensor `name` built from its checkpoint pieces (read(piece) gives each) by transformers' own
    load-time conversion (e.g. per-expert linears stacked and concatenated), exactly as from_pretrained
    builds it."""
    from copy import deepcopy

    from transformers.core_model_loading import apply_converters, apply_renamings

    config_json = _key(config)
    model = _meta_model(config_json)
    renamings, converters = _converters(config_json)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    converter = None
    for piece in fused_at_load(config)[name]:
        target, pattern = apply_converters(apply_renamings(piece, renamings), converters)
        converter = converter or deepcopy(by_pattern[pattern])
        converter.add_tensor(target, piece, pattern, read(piece))
    return converter.convert(name, model=model, config=model.config)[name]


def checkpoint_names(config: dict) -> dict[str, str]:
    """{model parameter name: the name save_pretrained writes for it} (identical for most models;
    transformers 5 renames some, e.g. GPT-NeoX's embed_out -> lm_head)."""
    return dict(_checkpoint_names(_key(config)))


def expected_shapes(config: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({tensor name: shape}, {model name: checkpoint name}) of the model transformers builds from
    `config`: its state dict (parameters and persistent buffers, tied weights under both names), each
    tensor under the name the model has and under the name save_pretrained writes (transformers 5 renames
    some, e.g. GPT-NeoX's embed_out -> lm_head)."""
    model = meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = dict(_checkpoint_names(_key(config)))
    for model_name, ckpt_name in list(saved.items()):
        if model_name in shapes:
            shapes.setdefault(ckpt_name, shapes[model_name])
    model_names = {m: c for m, c in saved.items() if m in shapes}
    shapes.update(_split(_key(config))[1])
    return shapes, model_names


def unexpected_ok(config: dict):
    """A predicate: True for checkpoint tensors transformers knowingly ignores when it loads `config`
    (the model's _keys_to_ignore_on_load_unexpected, rotary inv_freq buffers)."""
    import re

    patterns = [
        re.compile(p) for p in getattr(meta_model(config), "_keys_to_ignore_on_load_unexpected", None) or []
    ]
    return lambda name: name.endswith("inv_freq") or any(p.search(name) for p in patterns)


def parameter_target(
    config: dict, module: str, depth: int, targets: list[str]
) -> tuple[str, int, bool] | None:
    """For a LoRA saved at `module` (`depth` ".base_layer"s deep), the parameter PEFT's ParamWrapper
    (target_parameters) adapts: (model parameter name, experts, swapped), or None where the module is a
    layer LoRA adapts as a whole (nn.Linear, an embedding, Conv1D) or is not in the model.

    PEFT wraps a module's targeted parameters in their registration order, each wrapper around the last,
    so the outermost adapts the last of them; a 3-D parameter is [experts, in, out] unless the module says
    `is_transposed` is False, when PEFT swaps in and out ([experts, out, in], transformers 5's experts)."""
    from torch import nn

    try:
        mod = meta_model(config).get_submodule(module)
    except AttributeError:
        return None
    if depth == 0 and (isinstance(mod, (nn.Linear, nn.Embedding)) or type(mod).__name__ == "Conv1D"):
        return None
    names = [
        n
        for n, _ in mod.named_parameters(recurse=False)
        if any(f"{module}.{n}" == t or f"{module}.{n}".endswith("." + t) for t in targets)
    ]
    if depth >= len(names):
        raise InputError(
            f"adapter_config.json: target_parameters {targets} select {len(names)} parameters of {module}, but "
            f"the adapter holds LoRA tensors for {depth + 1} or more; it was saved for another model."
        )
    param = getattr(mod, names[len(names) - 1 - depth])
    swapped = param.ndim == 3 and not getattr(mod, "is_transposed", False)
    return f"{module}.{names[len(names) - 1 - depth]}", param.shape[0] if param.ndim == 3 else 1, swapped


def unfuse(config: dict, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model tensor transformers builds from several checkpoint tensors (fused_at_load), split back into
    them by transformers' own revert_weight_conversion, as save_pretrained splits it: {checkpoint name:
    tensor}."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(_meta_model(_key(config)), {name: tensor})
