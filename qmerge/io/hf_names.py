"""How a checkpoint's tensors stand to the model transformers builds: under which names it stores them
(save_pretrained's names, or a release's layout transformers renames when it loads it), and which it
stores transposed (transformers swaps them back at load). Found by transformers' own load-time
conversions (hf_meta.py's meta model)."""

from __future__ import annotations

from functools import lru_cache

from .hf_meta import _converters, _key, checkpoint_names, meta_model


def stored_as(config: dict, stored: list[str]) -> dict[str, str]:
    """{model parameter name: the name this checkpoint stores it by}: the names save_pretrained writes
    (checkpoint_names), and those of a checkpoint in a layout transformers renames when it loads it (a
    release saved before the model class changed, e.g. Gemma 3's `vision_tower.vision_model.*`),
    by transformers' own load-time renamings, and those of a checkpoint saved from the base model, without
    the head model's prefix (`base_model_prefix`), which transformers adds when it loads it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    model = meta_model(config)
    renamings = [  # with the sub-models' prefix changes (SigLIP's vision_model.* inside Gemma 3)
        t
        for t in get_model_conversion_mapping(model, add_legacy=False)
        if isinstance(t, (WeightRenaming, PrefixChange))
    ]
    names = checkpoint_names(config)
    params, saved = set(model.state_dict()), set(names.values())
    prefix = getattr(model, "base_model_prefix", "")
    for name in stored:
        if name in params or name in saved:
            continue
        loaded = apply_renamings(name, renamings)
        if loaded not in params and prefix and f"{prefix}.{loaded}" in params:
            loaded = f"{prefix}.{loaded}"  # saved from the base model (GPT-2's release: h.0.*, not transformer.h.0.*)
        if loaded in params:
            names[loaded] = name
    return names


@lru_cache(maxsize=4)
def _transposes(config_json: str) -> tuple[tuple[str, int, int], ...]:
    """(source pattern, dim0, dim1) of transformers' load-time conversions that transpose a checkpoint
    tensor when its shape is not the model's (Qwen3-VL-MoE's fused experts, released as [experts, in, out])."""
    return tuple(
        (c.source_patterns[0], op.dim0, op.dim1)
        for c in _converters(config_json)[1]
        for op in getattr(c, "operations", ())
        if type(op).__name__ == "Transpose" and len(c.source_patterns) == 1
    )


def transposed_at_load(
    config: dict, name: str, stored: tuple[int, ...], model: tuple[int, ...]
) -> tuple[int, int] | None:
    """The two dimensions transformers swaps when it loads stored tensor `name` of shape `stored` into the
    model's `model` shape (a checkpoint in its release's layout), or None."""
    import re

    for pattern, d0, d1 in _transposes(_key(config)):
        swapped = list(stored)
        if len(swapped) > max(d0, d1) and re.search(pattern, name):
            swapped[d0], swapped[d1] = swapped[d1], swapped[d0]
            return (d0, d1) if tuple(swapped) == tuple(model) else None
    return None
