"""LoRA scaling: alpha / r, alpha / sqrt(r) with rsLoRA, and per-module rank/alpha patterns."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoraSettings:
    """The LoraConfig fields that decide how a module's delta is scaled and applied."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first pattern that matches the end of a dotted module name (same rule as peft.utils.other)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (as peft's LoraLayer.update_layer)."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def module_rank_alpha(settings: LoraSettings, module: str) -> tuple[int, float]:
    """(r, alpha) of one module after rank_pattern and alpha_pattern."""
    r_key = get_pattern_key(settings.rank_pattern.keys(), module)
    a_key = get_pattern_key(settings.alpha_pattern.keys(), module)
    return int(settings.rank_pattern.get(r_key, settings.r)), float(
        settings.alpha_pattern.get(a_key, settings.lora_alpha)
    )


def module_scaling(settings: LoraSettings, module: str) -> float:
    """The scaling factor peft applies to B @ A for `module`."""
    r, alpha = module_rank_alpha(settings, module)
    return lora_scaling(r, alpha, settings.use_rslora)
