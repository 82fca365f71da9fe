"""The dtype names qmerge's options, configs and quant states use, in one table (torch only)."""

from __future__ import annotations

import torch

from .errors import OptionError, OutputError

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
    """'bf16' -> torch.bfloat16 (an OptionError names the choices)."""
    if name not in OPTIONS:
        raise OptionError(f"dtype must be one of {', '.join(OPTION_NAMES)}, got {name!r}.")
    return OPTIONS[name]


def config_dtype(name: object) -> torch.dtype | None:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; None for a name that is not one of the three."""
    return _BY_CONFIG_NAME.get(str(name).replace("torch.", ""))


def config_name(dtype: torch.dtype) -> str:
    return CONFIG_NAMES[dtype]


def cast_finite(value: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`value` cast to `dtype`, refused (OutputError naming the tensor) when the cast turns finite values
    into inf: a merged weight beyond fp16's 65504 must not be written as inf."""
    out = value.to(dtype)
    if out.dtype == value.dtype or dtype not in (torch.float16, torch.bfloat16) or torch.isfinite(out).all():
        return out
    finite = torch.isfinite(value)
    if not finite.all():
        return out  # non-finite already before the cast: the fp32 merge holds it too
    peak = value.abs().max().item()
    holds = ", ".join(k for k, d in OPTIONS.items() if d != dtype and torch.finfo(d).max >= peak)
    raise OutputError(
        f"tensor {name}: its values reach {peak:.6g}, beyond what {CONFIG_NAMES[dtype]} holds (at most "
        f"{torch.finfo(dtype).max:.6g}); written in {CONFIG_NAMES[dtype]} they would be inf. Nothing was "
        f"written. Choose a dtype that holds them ({holds})."
    )
