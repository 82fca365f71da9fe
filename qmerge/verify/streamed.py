"""The unmerged QLoRA model streamed as pipeline/model.py streams a merged one: PEFT's LoRA layers over
transformers' modules on the meta device, adapter weights captured from PEFT's own key translation, base
weights as training saw them, one module at a time; and the forward helpers check uses on both models."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..pipeline.model import (
    LazyWeights,
    attach,
    base_weights,
    decoder_layers,
    empty_model,
    parameter_names,
    quiet_libraries,
)
from ..pipeline.source import Source

Progress = Callable[[str, int, int], None]


def streamed_reference(source: Source):
    """The unmerged QLoRA model: PEFT's LoRA layers (scaling, rsLoRA, patterns, DoRA, modules_to_save, tied
    copies as PEFT computes them) over the weights training saw, one module's weights at a time."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from torch.nn.modules.module import _IncompatibleKeys

    with quiet_libraries():
        model = PeftModel.from_pretrained(
            empty_model(source), str(source.adapter.path), low_cpu_mem_usage=True
        )
    model.eval()
    # PEFT keeps adapter weights on the device of the base layer (here: meta). Its own key translation
    # (adapter file -> parameter names) is captured instead, and those tensors served by the hooks.
    adapter: dict[str, torch.Tensor] = {}

    def capture(state_dict, strict=True, assign=False):
        adapter.update(state_dict)
        return _IncompatibleKeys([], [])

    model.load_state_dict = capture
    try:
        set_peft_model_state_dict(model, load_peft_weights(str(source.adapter.path), device="cpu"))
    finally:
        del model.load_state_dict
    base = base_weights(source)
    _real_token_originals(model)
    held = _held_as(model, adapter)

    def weight(name: str) -> torch.Tensor:
        name = held.get(name, name)
        if name in adapter:
            return adapter[name].float() if adapter[name].is_floating_point() else adapter[name]
        plain = (
            re.sub(r"(\.base_layer)+\.", ".", name.removeprefix("base_model.model."))  # nested wrappers
            .replace(".original_module.", ".")
            .replace(".token_adapter.", ".")
        )
        return base(plain)

    attach(model, LazyWeights(weight, parameter_names(model)))
    return model


def _real_token_originals(model) -> None:
    """Trainable tokens' original rows are a buffer PEFT made from the (meta) embedding; only unmerge reads
    them, but the offload hooks need every buffer real."""
    for module in model.modules():
        originals = getattr(module, "trainable_tokens_original", None)
        for name in list(originals or ()):
            if originals[name].is_meta:
                originals[name] = torch.zeros(originals[name].shape, dtype=originals[name].dtype)


def _held_as(model, adapter: dict) -> dict[str, str]:
    """{parameter name: the adapter key holding it} for parameters PEFT shares between modules (a tied
    lm_head's trainable tokens are the embedding's): the hooks ask for them under each name."""
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    return {n: k for names in shared.values() for k in names if k in adapter for n in names}


def report_layers(model, phase: str, progress: Progress | None) -> list:
    """Hooks that report (phase, layer i, of N) as each decoder layer starts; returns them for removal."""
    layers = decoder_layers(model)
    if progress is None or layers is None:
        return []
    n = len(layers)
    return [
        layer.register_forward_pre_hook(lambda *_, i=i: progress(f"{phase}: layer {i + 1}/{n}", i, n))
        for i, layer in enumerate(layers)
    ]


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [n, seq, vocab] of token ids [n, seq], all sequences in one forward (each module's
    weights are made once per call)."""
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()
