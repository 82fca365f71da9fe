"""Run the steps one tensor at a time, reading the next tensor's stored parts while this one is computed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..dtypes import cast_finite
from .source import Source
from .steps import Change, Step

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the output model, and (with keep_base) the fp32 weight before the adapter changed it."""

    name: str
    value: torch.Tensor  # in the planned dtype for floating tensors, as stored otherwise
    base: torch.Tensor | None = None
    merged: bool = False  # a LoRA delta, DoRA, bias or replacement was applied


def merged_tensors(
    source: Source,
    steps: dict[str, Step],
    dtypes: dict[str, torch.dtype | None],
    order: list[str],
    keep_base: bool = False,
    progress: Progress | None = None,
) -> Iterator[MergedTensor]:
    """Yield the tensors of `order` one at a time, each made by its step and cast to its dtype."""
    for i, name in enumerate(order):
        if progress:
            progress(name, i, len(order))
        if i + 1 < len(order):
            _read_ahead(source, steps[order[i + 1]])
        yield _run(source, name, steps[name], dtypes[name], keep_base)
    if progress:
        progress("", len(order), len(order))


def merged_tensor(source: Source, name: str, keep_base: bool = False) -> MergedTensor:
    """One tensor of the output model in fp32 (with keep_base, and the weight before the adapter)."""
    from .steps import plan_steps

    return _run(source, name, plan_steps(source, {name: None}, keep_base)[name], None, keep_base)


def _run(source: Source, name: str, step: Step, dtype: torch.dtype | None, keep_base: bool) -> MergedTensor:
    before = None
    if keep_base and isinstance(step, Change):
        weight = step.base.run(source, None)
        before = weight.clone()  # the change may work in place
        value = step.apply(source, weight)
    else:
        value = step.run(source, dtype)
    if dtype is not None and value.is_floating_point():
        value = cast_finite(value, dtype, name)
    return MergedTensor(name, value, before, step.merged)


def _read_ahead(source: Source, step: Step) -> None:
    """Have the stored tensors `step` is made from read on a background thread meanwhile."""
    reads = step.reads(source)
    if source.adapter is not None:
        source.adapter.store.prefetch([k for store, k in reads if store == "adapter"])
    source.base.store.prefetch([k for store, k in reads if store == "base"])
