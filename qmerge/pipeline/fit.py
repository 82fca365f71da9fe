"""Whether an adapter fits its base, and whether a base's config.json fits its tensors: every finding from
shapes and configs alone, before any tensor is computed."""

from __future__ import annotations

import re
import sys

import torch

from ..errors import InputError, MismatchError, UnsupportedError
from ..io.adapter import Adapter, selects_none
from ..io.hf_dir import ModelDir
from .adapter_fit import adapter_problems
from .problem import Problem
from .source import Source

__all__ = [
    "Problem",
    "adapter_problems",
    "base_problems",
    "check_fit",
    "confirm",
    "problems",
    "target_problems",
]

_LAYER = re.compile(r"\.(\d+)\.")


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
    stored_as = base.stored_as()  # with a layout transformers renames at load
    expected |= {name: expected[m] for m, name in stored_as.items() if m in expected and name not in expected}
    ignored = unexpected_ok(base.config)
    tied = source_tied(source)
    found = []
    for name, shape in stored.items():
        want = expected.get(name)
        if want is not None and not _same_shape(base.config, name, shape, want):
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
        and stored_as.get(n) not in stored
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


def _same_shape(config: dict, name: str, shape: tuple, want: tuple) -> bool:
    """The stored shape is the model's, or one transformers transposes into it at load (a release's layout)."""
    from ..io.hf_names import transposed_at_load

    return (
        tuple(want) == tuple(shape) or transposed_at_load(config, name, tuple(shape), tuple(want)) is not None
    )


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


def target_problems(adapter: Adapter) -> list[Problem]:
    """adapter_config.json's target_modules select none of the modules the adapter holds LoRA tensors for:
    PEFT refuses to load it (a module some target selects is enough: a tied lm_head's keys, say, need no
    target of their own)."""
    if not selects_none(adapter):
        return []
    return [
        Problem(
            "error",
            f"{adapter.path}/adapter_config.json: target_modules {adapter.config.get('target_modules')!r} select "
            f"none of the {len(adapter.layout.lora)} modules the adapter holds LoRA tensors for (e.g. "
            f"{min(m.module for m in adapter.layout.lora.values())}); PEFT refuses to load this adapter. Fix "
            "target_modules (the modules LoRA was trained on), or re-save the adapter with PEFT.",
        )
    ]


def check_fit(source: Source, background: bool = False) -> None:
    """Raise with every error-level problem, one per line: MismatchError for an adapter that does not fit
    its base, InputError for a base whose config.json does not fit its tensors.

    The config check builds the model on the meta device with transformers, whose import costs seconds
    (about a third of a 1.1B merge from a 4-bit base). With `background`, when this process has no other
    use for transformers, it runs in a child process on the other core while the merge starts;
    `confirm` raises what it found before anything is committed.
    """
    adapter = source.adapter
    if background and "transformers" not in sys.modules and not _needs_transformers(source):
        from .background import BackgroundCheck

        source.base_check = BackgroundCheck(source.base, adapter)  # target_problems there too
        found = adapter_problems(source)
    else:
        _raise(source, base_problems(source), "base")  # a base that is wrong in itself is said first
        found = adapter_problems(source) + (target_problems(adapter) if adapter is not None else [])
    _raise(source, found, "adapter")
    source.warnings += [p.message for p in found if p.severity == "warning"]


def _needs_transformers(source: Source) -> bool:
    """The merge itself asks transformers which layers bitsandbytes quantizes (a 16-bit base)."""
    return not source.base.is_4bit and source.merge_base == "dequantized"


def confirm(source: Source, wait: bool = True) -> None:
    """Raise what the background config check found (without `wait`: only once it has finished)."""
    check = source.base_check
    if check is not None and (wait or check.done()):
        source.base_check = None
        found = check.problems()
        _raise(source, [p for p in found if p.subject == "base"], "base")
        _raise(source, [p for p in found if p.subject != "base"], "adapter")
