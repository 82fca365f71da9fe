"""The dtype names qmerge's options, configs and quant states use, in one table (torch only)."""

from __future__ import annotations

import torch

# --dtype / --quant-dtype / --nf4-compute-dtype / --compute-dtype choices
OPTIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTION_NAMES = tuple(OPTIONS)
# config.json ("dtype", "torch_dtype", "bnb_4bit_compute_dtype") and bitsandbytes quant-state JSON names
CONFIG_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
_BY_CONFIG_NAME = {v: k for k, v in CONFIG_NAMES.items()}


def option_dtype(name: str) -> torch.dtype:
    """'bf16' -> torch.bfloat16 (a ValueError names the choices)."""
    if name not in OPTIONS:
        raise ValueError(f"dtype must be one of {', '.join(OPTION_NAMES)}, got {name!r}")
    return OPTIONS[name]


def config_dtype(name: object) -> torch.dtype | None:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; None for a name that is not one of the three."""
    return _BY_CONFIG_NAME.get(str(name).replace("torch.", ""))


def config_name(dtype: torch.dtype) -> str:
    return CONFIG_NAMES[dtype]
