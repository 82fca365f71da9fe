"""LoRA on parameters (PEFT's target_parameters, ParamWrapper): MoE experts fused into 3-D parameters
and routers. The delta is made as PEFT makes it, on the model parameter, then split into the tensors the
checkpoint stores (per-expert linears, by transformers' own revert conversion) so that it is added to
each stored tensor in its own layout. Memory: one fused parameter's delta (and its pieces) at a time,
of the few kept for the layer in progress."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace

import torch

from ..errors import MismatchError
from ..io.adapter import Adapter, AdapterLayout, LoraModule
from ..io.hf_dir import ModelDir
from ..lora.delta import parameter_delta
from ..lora.scaling import module_rank_alpha, module_scaling

_KEPT = 4  # fused deltas kept (a layer's gate_up and down, its router): the merge reads their pieces in turn


def as_parameters(layout: AdapterLayout, base: ModelDir, adapter: Adapter) -> AdapterLayout:
    """The layout with the LoRA modules that adapt parameters (target_parameters) moved to `params`, keyed
    by the model parameter each adapts, their shapes checked against it."""
    targets = adapter.target_parameters
    if not targets:
        return layout
    from ..io.hf_meta import parameter_target

    lora, params = {}, {}
    for key, m in layout.lora.items():
        found = parameter_target(base.config, m.module, m.depth, targets)
        if found is None:
            lora[key] = m
            continue
        _check_shapes(adapter, m, base, *found)
        params[found[0]] = replace(m, target=found)
    return replace(layout, lora=lora, params=params)


def _check_shapes(adapter: Adapter, m: LoraModule, base: ModelDir, name: str, experts: int, swapped: bool):
    from ..io.hf_meta import meta_model

    shape = tuple(meta_model(base.config).get_parameter(name).shape)
    out_in = (shape[1], shape[2]) if swapped else (shape[2], shape[1]) if len(shape) == 3 else shape
    a, b = adapter.store.shape(m.lora_A), adapter.store.shape(m.lora_B)
    r, _ = module_rank_alpha(adapter.settings, name)  # PEFT keys patterns by the parameter's name
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] != r * experts or (b[0], a[1]) != tuple(out_in):
        raise MismatchError(
            f"{adapter.path}: the LoRA on {name} (lora_A {list(a)}, lora_B {list(b)}) does not fit the parameter "
            f"{list(shape)} of base {base.path}: the adapter was trained on another model."
        )


class ParamDeltas:
    """The deltas of LoRA on parameters, under the names the base checkpoint stores the tensors by."""

    def __init__(self, source):
        from ..io.hf_meta import fused_at_load

        self.source, config = source, source.base.config
        saved, fused = source.base.stored_as(), fused_at_load(config)
        self.owner: dict[str, str] = {}  # stored tensor -> the model parameter whose delta it takes a part of
        for param in source.layout.params:
            for piece in fused.get(param) or (saved.get(param, param),):
                self.owner[piece] = param
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.owner

    def keys_of(self, name: str) -> list[str]:
        m = self.source.layout.params[self.owner[name]]
        return [m.lora_A, m.lora_B]

    def rank_scaling(self, name: str) -> tuple[int, float]:
        """(r, scaling) of the LoRA whose delta stored tensor `name` takes a part of."""
        param = self.owner[name]
        return module_rank_alpha(self.source.settings, param)[0], module_scaling(self.source.settings, param)

    def delta(self, name: str) -> torch.Tensor:
        """fp32 delta of stored tensor `name` (its shape)."""
        param = self.owner[name]
        with self._lock:
            if param not in self._cache:
                self._cache[param] = self._split(param)
                while len(self._cache) > _KEPT:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(param)
            return self._cache[param][name]

    def _split(self, param: str) -> dict[str, torch.Tensor]:
        from ..io.hf_meta import fused_at_load, unfuse

        src, config = self.source, self.source.base.config
        m = src.layout.params[param]
        A, B = src.adapter_tensor(m.lora_A), src.adapter_tensor(m.lora_B)
        # PEFT matches rank_pattern/alpha_pattern against the parameter's name (it writes
        # ".*\.gate_up_proj": 2r itself for a fused gate and up projection)
        _, experts, swapped = m.target
        delta = parameter_delta(A, B, module_scaling(src.settings, param), experts, swapped)
        if param in fused_at_load(config):
            return {k: v.contiguous() for k, v in unfuse(config, param, delta).items()}
        stored = src.base.stored_as().get(param, param)
        if tuple(delta.shape) != tuple(
            src.base_shape(stored)
        ):  # stored transposed (transformers swaps it back)
            from ..io.hf_names import transposed_at_load

            if dims := transposed_at_load(config, stored, tuple(src.base_shape(stored)), tuple(delta.shape)):
                delta = delta.transpose(*dims).contiguous()
        return {stored: delta}
