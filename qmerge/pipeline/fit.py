"""Whether an adapter fits its base, and whether a base's config.json fits its tensors: every finding from
shapes and configs alone, before any tensor is computed."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

from ..errors import InputError, MismatchError, UnsupportedError
from ..io.adapter import LoraModule
from ..io.hf_dir import ModelDir
from ..lora.scaling import module_rank_alpha
from .source import Source

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Problem:
    """A finding: severity is "error" (merge refuses) or "warning"; subject is "adapter" or "base"."""

    severity: str
    message: str
    subject: str = "adapter"

    def to_json(self) -> dict:
        return {"severity": self.severity, "message": self.message}


def problems(source: Source) -> list[Problem]:
    """Everything that would make the merge wrong or impossible (base first, then adapter), and what the
    stored 4-bit tensors say about how the base was saved."""
    return base_problems(source) + stored_problems(source.base) + adapter_problems(source)


def base_problems(source: Source) -> list[Problem]:
    """config.json against the tensors: the model transformers builds from the config must have exactly the
    base's tensors with the base's shapes (else the output loads with layers missing, or not at all)."""
    from ..io.hf_meta import expected_shapes, unexpected_ok

    base = source.base
    try:
        expected, saved_as = expected_shapes(base.config)
    except UnsupportedError as e:
        return [Problem("warning", f"{base.path}: config.json not checked against the tensors ({e})", "base")]
    except InputError as e:
        return [Problem("error", str(e), "base")]
    stored = {n: source.base_shape(n) for n in base.weight_names()}
    ignored = unexpected_ok(base.config)
    tied = source_tied(source)
    found = []
    for name, shape in stored.items():
        want = expected.get(name)
        if want is not None and tuple(want) != tuple(shape):
            found.append(
                f"{name} is {list(shape)} in the weights but {list(want)} in the model config.json describes"
            )
        elif want is None and not ignored(name):
            where = "a layer" if _LAYER.search(name) else "a tensor"
            found.append(f"{name} is {where} the model config.json describes does not have")
    missing = [
        n
        for n, ckpt in saved_as.items()
        if n not in stored
        and ckpt not in stored
        and n not in tied
        and ckpt not in tied
        and not n.endswith("inv_freq")
    ]
    if missing:
        found.append(
            f"the weights lack {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    head = f"{base.path}: config.json does not match the weights"
    return [
        Problem("error", f"{head}: {m}. Fix config.json or re-save the model.", "base") for m in found[:20]
    ]


_REPACKED = (
    "this checkpoint was saved after a forward pass on CPU, which repacks bitsandbytes weights{detail}. "
    "Re-save the base from its 16-bit original."
)


def stored_problems(model: ModelDir) -> list[Problem]:
    """What the stored 4-bit tensors say about how the base was saved (warnings)."""
    qcfg = model.quantization_config or {}
    entries = list(model.quantized.values())
    found = []
    plain = [e.name for e in entries if e.nested_offset is None]
    if plain and qcfg.get("bnb_4bit_use_double_quant"):
        found.append(
            f"{len(plain)} 4-bit layers (e.g. {plain[0]}) are not double-quantized although quantization_config "
            "asks for it: " + _REPACKED.format(detail="")
        )
    repacked = [e for e in entries if e.nested_offset is not None and e.nested_dtype != torch.float32]
    if repacked:
        dtype = str(repacked[0].nested_dtype).replace("torch.", "")
        found.append(
            f"{len(repacked)} 4-bit layers (e.g. {repacked[0].name}) carry nested_dtype {dtype}: "
            + _REPACKED.format(
                detail=" (absmax rounded to bf16), so its 4-bit weights differ slightly from the "
                "ones training saw"
            )
        )
    odd = [
        e.name for e in entries if model.store.dtype(e.name + ".absmax") not in (torch.uint8, torch.float32)
    ]
    if odd:
        found.append(f"{len(odd)} 4-bit layers (e.g. {odd[0]}) store absmax in a repacked dtype.")
    if qcfg and not model.is_4bit:
        found.append("config.json has a quantization_config but no 4-bit tensors were found.")
    return [Problem("warning", m, "base") for m in found]


def source_tied(source: Source) -> set[str]:
    """Tensors transformers fills by tying (absent from a checkpoint by design)."""
    from ..io.hf_meta import tied_weights

    return set(tied_weights(source.base.config))


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


def _raise(source: Source, found: list[Problem], subject: str) -> None:
    errors = [p.message for p in found if p.severity == "error" and p.subject == subject]
    if not errors:
        return
    if subject == "base":
        head, error = f"{source.base.path} cannot be used:", InputError
    else:
        head, error = f"{source.adapter.path} does not fit base {source.base.path}:", MismatchError
    more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
    raise error("\n  ".join([head, *errors[:20]]) + more)


def check_fit(source: Source, background: bool = False) -> None:
    """Raise with every error-level problem, one per line: MismatchError for an adapter that does not fit
    its base, InputError for a base whose config.json does not fit its tensors.

    The config check builds the model on the meta device with transformers, whose import costs seconds
    (about a third of a 1.1B merge from a 4-bit base). With `background`, when this process has no other
    use for transformers, it runs in a child process on the other core while the merge starts;
    `confirm` raises what it found before anything is committed.
    """
    if background and "transformers" not in sys.modules and not _needs_transformers(source):
        from .background import BackgroundCheck

        source.base_check = BackgroundCheck(source.base)
    else:
        _raise(source, base_problems(source), "base")  # a base that is wrong in itself is said first
    _raise(source, adapter_problems(source), "adapter")


def _needs_transformers(source: Source) -> bool:
    """The merge itself asks transformers which layers bitsandbytes quantizes (a 16-bit base)."""
    return not source.base.is_4bit and source.merge_base == "dequantized"


def confirm(source: Source, wait: bool = True) -> None:
    """Raise what the background config check found (without `wait`: only once it has finished)."""
    check = source.base_check
    if check is not None and (wait or check.done()):
        source.base_check = None
        _raise(source, check.problems(), "base")
