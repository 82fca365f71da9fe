"""The dtype names qmerge's options, configs and quant states use, in one table (torch only)."""

from __future__ import annotations

import torch

from .errors import OptionError, OutputError
from .names import DTYPES

# --dtype / --quant-dtype / --nf4-compute-dtype / --compute-dtype choices
OPTION_NAMES = DTYPES
OPTIONS: dict[str, torch.dtype] = dict(
    zip(DTYPES, (torch.bfloat16, torch.float16, torch.float32), strict=True)
)
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


# The smallest magnitude that rounds to inf when cast (round to nearest even): halfway between the largest
# finite value and the next power of two, whose tie rounds up (the largest value's mantissa is odd).
_OVERFLOWS_AT = {torch.float16: 65520.0, torch.bfloat16: float.fromhex("0x1.ffp+127")}


def check_finite_cast(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Refuse (OutputError naming the tensor) a cast of `value` to `dtype` that would turn finite values into
    inf: a merged weight beyond fp16's 65504 must not be written as inf. One max-magnitude reduction over
    `value`, no temporary; values already non-finite in `value` are the merge's own, not the cast's."""
    limit = _OVERFLOWS_AT.get(dtype)
    if limit is None or not value.is_floating_point() or value.dtype == dtype or value.numel() == 0:
        return
    lo, hi = torch.aminmax(value)  # 10x faster here than vector_norm(inf) or abs().max()
    peak = max(-lo.item(), hi.item())
    if limit <= peak < float("inf"):
        holds = ", ".join(k for k, d in OPTIONS.items() if d != dtype and torch.finfo(d).max >= peak)
        raise OutputError(
            f"tensor {name}: its values reach {peak:.6g}, beyond what {CONFIG_NAMES[dtype]} holds (at most "
            f"{torch.finfo(dtype).max:.6g}); written in {CONFIG_NAMES[dtype]} they would be inf. Nothing was "
            f"written. Choose a dtype that holds them ({holds})."
        )


def cast_finite(value: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`value` cast to `dtype`, refused as check_finite_cast refuses it."""
    check_finite_cast(value, dtype, name)
    return value.to(dtype)
