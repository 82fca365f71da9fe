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

    stored = set(source.base.weight_names()) | set(source.base.stored_as())

    def weight(name: str) -> torch.Tensor:
        name = held.get(name, name)
        copy = re.sub(r"\.original_module\.", ".modules_to_save.default.", name)
        if name not in adapter and copy in adapter and _plain(name) not in stored:
            name = copy  # a head the fine-tune added (a classifier's score): the base has none; only its
            # trained copy ever runs, the original is loaded with it by the offload hook
        if name in adapter:
            return adapter[name].float() if adapter[name].is_floating_point() else adapter[name]
        return base(_plain(name))

    model.float()  # PEFT gives a saved head's copy the file's dtype; the hooks serve every weight in fp32
    attach(model, LazyWeights(weight, parameter_names(model)))
    return model


def _plain(name: str) -> str:
    """A PEFT model's parameter name as the base model has it."""
    return (
        re.sub(r"(\.base_layer)+\.", ".", name.removeprefix("base_model.model."))  # nested wrappers
        .replace(".original_module.", ".")
        .replace(".token_adapter.", ".")
    )


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


def logits(model, tokens: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
    """fp32 logits [n, seq, vocab] of token ids [n, seq] (and `inputs`: a record's images), all sequences in
    one forward (each module's weights are made once per call); a sequence classifier's [n, seq, labels]
    (forward_logits)."""
    return forward_logits(model, tokens, inputs).float()


def classifier_of_model(model):
    """The sequence classifier inside `model` (itself, or under PEFT's wrappers), or None."""
    from transformers import PreTrainedModel  # (PEFT's PeftModelForSequenceClassification is not one)

    return next(
        (
            m
            for m in model.modules()
            if isinstance(m, PreTrainedModel) and type(m).__name__.endswith("ForSequenceClassification")
        ),
        None,
    )


def forward_logits(model, tokens: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
    """The model's logits on token ids: a language model's next-token logits [n, seq, vocab]; a sequence
    classifier's class logits at every position [n, seq, labels], its head's output before transformers
    pools the last token: the classification of each prefix (a causal model's last-token pooling is that
    of the prefix it ends), the last position's being the sequence's."""
    classifier = classifier_of_model(model)
    with torch.no_grad():
        if classifier is None:
            return model(input_ids=tokens, **(inputs or {})).logits
        head = next(m for n, m in classifier.named_children() if n in ("score", "classifier"))
        seen: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, _i, out: seen.append(out))
        pad = classifier.config.pad_token_id
        if pad is None:  # transformers refuses batches without one; the pooled output is not used
            classifier.config.pad_token_id = -1
        try:
            model(input_ids=tokens)
        finally:
            hook.remove()
            classifier.config.pad_token_id = pad
        return seen[-1]
