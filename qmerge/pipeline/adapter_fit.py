"""Whether an adapter fits its base: every LoRA module, whole-tensor replacement and trainable-token row
set against the base's shapes (fit.py runs it with the base's own checks)."""

from __future__ import annotations

import re

from ..io.adapter import LoraModule
from ..lora.scaling import module_rank_alpha
from .problem import Problem
from .source import Source


def adapter_problems(source: Source) -> list[Problem]:
    if source.adapter is None:
        return []
    found: list[Problem] = []
    for mod in source.layout.lora.values():
        found += _module_problems(source, mod)
    for target, key in source.layout.replace.items():
        found += _replacement_problems(source, target, key)
    for target, (key, indices) in source.layout.rows.items():
        found += _rows_problems(source, target, key, indices)
    if source.settings.lora_alpha == 0 and source.layout.lora:
        found.append(
            Problem("warning", "lora_alpha is 0: every LoRA scaling is zero and the adapter changes nothing.")
        )
    return found


def _replacement_problems(source: Source, target: str, key: str) -> list[Problem]:
    """A whole-tensor replacement (modules_to_save) has the base tensor's shape; only the vocabulary
    dimension of the embedding and output layer may differ (an adapter trained with added tokens)."""
    names = set(source.base.weight_names()) | set(source.aliases)
    if target not in names and source.task_config is not None:
        return _head_problems(source, target, key)
    if target not in names:
        return [Problem("error", f"adapter tensor {key} replaces {target}, which the base does not have.")]
    old = source.base_shape(source.aliases.get(target, target))
    new = source.tensors[target].shape
    vocab = source.base.config.get("vocab_size")
    resize = len(new) == 2 and len(old) == 2 and new[1] == old[1] and old[0] == vocab
    if tuple(new) != tuple(old) and not resize:
        return [
            Problem(
                "error",
                f"adapter tensor {key} is {list(new)} but replaces {target}, which is {list(old)}; the adapter "
                "was trained on another base.",
            )
        ]
    if tuple(new) != tuple(old):
        return _vocabulary_problems(source, target, key, new[0], vocab)
    return []


def _head_problems(source: Source, target: str, key: str) -> list[Problem]:
    """A SEQ_CLS adapter's head (score / classifier), new in the classifier: the shape the classifier has."""
    from ..io.hf_meta import expected_shapes

    want = expected_shapes(source.task_config)[0].get(target)
    got = tuple(source.adapter.store.shape(key))
    if want is None:
        return [
            Problem("error", f"adapter tensor {key} replaces {target}, which the classifier does not have.")
        ]
    if tuple(want) != got:
        return [
            Problem(
                "error", f"adapter tensor {key} is {list(got)}; the classifier's {target} is {list(want)}."
            )
        ]
    return []


# Names transformers' families give the input embedding and the output layer.
_VOCABULARY = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings|tok_embeddings|output)\.weight$"
)


def _vocabulary_problems(source: Source, target: str, key: str, rows: int, vocab: int) -> list[Problem]:
    """A replacement that resizes the vocabulary (tokens added in training) must leave every vocabulary
    tensor of the merged model (embedding, output layer) with the same rows, or transformers cannot load it."""
    width = source.tensors[target].shape[1]
    for name, t in source.tensors.items():
        if name == target or not _VOCABULARY.search(name) or len(t.shape) != 2 or t.shape[1] != width:
            continue
        stored = (
            source.base_shape(source.aliases.get(name, name)) if name not in source.layout.replace else None
        )
        if (stored is None or stored[0] == vocab) and t.shape[0] != rows:
            return [
                Problem(
                    "error",
                    f"adapter tensor {key} gives {target} {rows} rows, but {name} has {t.shape[0]}: the merged "
                    f"model's vocabulary sizes would disagree (the base's is {vocab}) and transformers could not "
                    "load it. The adapter was saved from another model, or resized one of the two only.",
                )
            ]
    return []


def _module_problems(source: Source, mod: LoraModule) -> list[Problem]:
    if mod.weight not in source.tensors:
        return [
            Problem(
                "error",
                f"adapter targets {mod.module}, which the base does not have (no tensor {mod.weight}); "
                "the adapter was trained on another base.",
            )
        ]
    shape = source.tensors[mod.weight].shape
    return (
        _lora_shape_problems(source, mod, shape)
        + _dora_problems(source, mod, shape)
        + _bias_problems(source, mod)
    )


def _lora_shape_problems(source: Source, mod: LoraModule, shape: tuple[int, ...]) -> list[Problem]:
    """lora_A [r, in] and lora_B [out, r] for a base weight [out, in] (transposed for embeddings and
    fan_in_fan_out), with r as adapter_config.json gives it."""
    a_shape, b_shape = source.adapter.store.shape(mod.lora_A), source.adapter.store.shape(mod.lora_B)
    if len(shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
        found = f"base weight is {list(shape)}, lora_A {list(a_shape)} and lora_B {list(b_shape)}"
        return [Problem("error", f"{mod.module}: {found}; LoRA needs 2-D matrices.")]
    if mod.kind == "embedding" or source.settings.fan_in_fan_out:
        expected_a, expected_b = (a_shape[0], shape[0]), (shape[1], a_shape[0])
    else:
        expected_a, expected_b = (a_shape[0], shape[1]), (shape[0], a_shape[0])
    if tuple(a_shape) != expected_a or tuple(b_shape) != expected_b:
        return [
            Problem(
                "error",
                f"{mod.module}: base weight is {list(shape)} but lora_A is {list(a_shape)} and lora_B "
                f"{list(b_shape)}; the adapter was trained on another base.",
            )
        ]
    r, _alpha = module_rank_alpha(source.settings, mod.module)
    if a_shape[0] != r:
        return [
            Problem(
                "error",
                f"{mod.module}: adapter_config.json gives rank {r} but lora_A has {a_shape[0]} rows; "
                "rank_pattern and the tensors disagree.",
            )
        ]
    return []


def _dora_problems(source: Source, mod: LoraModule, shape: tuple[int, ...]) -> list[Problem]:
    settings = source.settings
    if mod.magnitude is None:
        if settings.use_dora and mod.kind == "linear":
            return [
                Problem(
                    "error", f"{mod.module}: use_dora is set but the adapter has no lora_magnitude_vector."
                )
            ]
        return []
    if mod.kind == "embedding":
        return [Problem("error", f"{mod.module}: DoRA on embeddings is not supported.")]
    mag = tuple(source.adapter.store.shape(mod.magnitude))
    rows = shape[1] if settings.fan_in_fan_out else shape[0]
    if len(shape) != 2 or mag != (rows,):
        return [
            Problem(
                "error", f"{mod.module}: DoRA magnitude has shape {list(mag)}; the weight has {rows} rows."
            )
        ]
    return []


def _bias_problems(source: Source, mod: LoraModule) -> list[Problem]:
    if mod.lora_B_bias is None:
        return []
    bias = mod.module + ".bias"
    if bias not in source.tensors:
        return [
            Problem(
                "error",
                f"{mod.module}: the adapter has a LoRA bias (lora_bias=True) but the base layer has no bias "
                "to add it to: the merged model would need a bias its config does not give it (PEFT's merge fails "
                "on it too); train with lora_bias=False or on a base whose layers have biases.",
            )
        ]
    if tuple(source.adapter.store.shape(mod.lora_B_bias)) != tuple(source.tensors[bias].shape):
        return [Problem("error", f"{mod.module}: the LoRA bias does not have the base bias's shape.")]
    return []


def _rows_problems(source: Source, target: str, key: str, indices: tuple[int, ...]) -> list[Problem]:
    """Trainable tokens: rows of a 2-D base weight the adapter changes in no other way."""
    where = target.removesuffix(".weight")
    spec = source.tensors.get(target)
    if spec is None or len(spec.shape) != 2:
        return [
            Problem("error", f"{where}: trainable tokens on a weight the base does not hold as a 2-D tensor.")
        ]
    if target in source.layout.replace or any(m.weight == target for m in source.layout.lora.values()):
        return [Problem("error", f"{where}: trainable tokens and another change of the same weight.")]
    shape = tuple(source.adapter.store.shape(key))
    if shape != (len(indices), spec.shape[1]):
        return [
            Problem(
                "error",
                f"{where}: trainable tokens hold {list(shape)} but {len(indices)} token ids of "
                f"{spec.shape[1]} values were configured.",
            )
        ]
    if max(indices) >= spec.shape[0]:
        return [Problem("error", f"{where}: token id {max(indices)} is beyond the {spec.shape[0]} rows.")]
    return []
