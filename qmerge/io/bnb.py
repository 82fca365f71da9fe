"""bitsandbytes 4-bit weights as transformers saves them, in both directions: the tensor keys beside each
packed weight, the quant-state JSON, and config.json's quantization_config.

Per quantized Linear X: X.weight (packed codes), X.weight.absmax, X.weight.quant_map, with double
quantization X.weight.nested_absmax and X.weight.nested_quant_map, and X.weight.quant_state.bitsandbytes__nf4
(uint8 UTF-8 JSON), as bitsandbytes' QuantState.as_dict(packed=True) writes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from math import prod

import torch

from .. import dtypes
from ..errors import InputError
from ..quant.blockwise import QuantState
from ..quant.codebooks import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE
from .safetensors import PlannedTensor

QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_STATE_MARK = ".quant_state.bitsandbytes__"
QUANT_TYPES = ("nf4", "fp4")
# The quant-state JSON carries nested_offset as a float repr of unknown length; qmerge pads it with
# spaces to this many characters (json.loads ignores them) so a shard header can be written first.
_OFFSET_WIDTH = 26


def state_key(name: str, quant_type: str) -> str:
    return f"{name}{QUANT_STATE_MARK}{quant_type}"


@dataclass(frozen=True)
class QuantEntry:
    """A bitsandbytes 4-bit weight in a checkpoint: the packed tensor's name and its parsed state JSON."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_offset: float | None
    nested_blocksize: int
    nested_dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(self.numel // -self.blocksize)


def _field_dtype(state: dict, key: str, where: str) -> torch.dtype:
    value = state.get(key) or "float32"
    dt = dtypes.config_dtype(value)
    if dt is None:
        raise InputError(f"{where}: {key} {value!r} is not float32, float16 or bfloat16.")
    return dt


def parse_state(key: str, raw: bytes, where: str) -> QuantEntry:
    """The QuantEntry a quant-state JSON describes, every field checked (raises InputError naming `key`)."""
    here = f"{where}: quant state {key!r}"
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{here} is not UTF-8 JSON ({e}). Re-save the 4-bit base.") from e
    if not isinstance(state, dict):
        raise InputError(f"{here} is not a JSON object. Re-save the 4-bit base.")
    qt, bs, shape = state.get("quant_type"), state.get("blocksize"), state.get("shape")
    if qt not in QUANT_TYPES:
        raise InputError(f"{here}: quant_type {qt!r}; bitsandbytes 4-bit uses nf4 or fp4.")
    if type(bs) is not int or bs not in BLOCKSIZES_4BIT:
        raise InputError(f"{here}: blocksize {bs!r}; bitsandbytes uses one of {list(BLOCKSIZES_4BIT)}.")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise InputError(f"{here}: shape {shape!r} is not a list of positive integers.")
    offset = state.get("nested_offset")
    if offset is not None and (
        isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset)
    ):
        raise InputError(f"{here}: nested_offset {offset!r} is not a finite number.")
    nbs = state.get("nested_blocksize", NESTED_BLOCKSIZE)
    if offset is not None and (type(nbs) is not int or nbs <= 0):
        raise InputError(f"{here}: nested_blocksize {nbs!r} is not a positive integer.")
    return QuantEntry(
        name=key.split(QUANT_STATE_MARK)[0],
        quant_type=qt,
        blocksize=bs,
        dtype=_field_dtype(state, "dtype", here),
        shape=tuple(shape),
        nested_offset=None if offset is None else float(offset),
        nested_blocksize=int(nbs) if offset is not None else NESTED_BLOCKSIZE,
        nested_dtype=_field_dtype(state, "nested_dtype", here),
    )


def expected_parts(e: QuantEntry) -> dict[str, tuple[int, tuple[torch.dtype, ...]]]:
    """{stored key: (element count, allowed dtypes)} of the tensors beside a 4-bit weight (not the packed
    codes, whose storage dtype varies with bnb_4bit_quant_storage)."""
    parts = {e.name + ".quant_map": (16, (torch.float32,))}
    if e.nested_offset is None:
        parts[e.name + ".absmax"] = (e.blocks, (torch.float32, torch.bfloat16, torch.float16))
    else:
        parts[e.name + ".absmax"] = (e.blocks, (torch.uint8,))
        parts[e.name + ".nested_absmax"] = (
            -(e.blocks // -e.nested_blocksize),
            (torch.float32, torch.bfloat16),
        )
        parts[e.name + ".nested_quant_map"] = (256, (torch.float32,))
    return parts


def packed_bytes(e: QuantEntry) -> int:
    """Bytes of packed codes a 4-bit weight of this shape holds: two codes per byte."""
    return (e.numel + 1) // 2


def quant_state(e: QuantEntry, get) -> tuple[torch.Tensor, QuantState]:
    """The packed codes and QuantState of 4-bit weight `e`, its tensors read with `get(key)`."""
    nested = e.nested_offset is not None
    state = QuantState(
        absmax=get(e.name + ".absmax"),
        shape=e.shape,
        dtype=e.dtype,
        blocksize=e.blocksize,
        quant_type=e.quant_type,
        code=get(e.name + ".quant_map").float(),
        offset=torch.tensor(float(e.nested_offset), dtype=torch.float32) if nested else None,
        nested_absmax=get(e.name + ".nested_absmax").float() if nested else None,
        nested_code=get(e.name + ".nested_quant_map").float() if nested else None,
        nested_blocksize=e.nested_blocksize,
        nested_dtype=e.nested_dtype,
    )
    return get(e.name), state


# ---- writing ------------------------------------------------------------------------------------------


def state_json(state: QuantState, offset: float | None) -> bytes:
    """The packed quant-state JSON bitsandbytes writes (QuantState.as_dict(packed=True)), space-padded."""
    d = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": dtypes.config_name(state.dtype),
        "shape": list(state.shape),
    }
    if offset is not None:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    raw = json.dumps(d)
    if offset is not None:
        raw += " " * (_OFFSET_WIDTH - len(repr(float(offset))))
    return raw.encode("utf-8")


def planned_entries(
    name: str, shape: tuple[int, ...], blocksize: int, double_quant: bool, quant_type: str, dtype: torch.dtype
) -> list[PlannedTensor]:
    """The tensors one 4-bit weight becomes in a checkpoint, with exact sizes, in state_tensors' order."""
    n = prod(shape)
    blocks = -(n // -blocksize)
    placeholder = QuantState(torch.empty(0), tuple(shape), dtype, blocksize, quant_type, torch.empty(16))
    # state_json pads nested_offset to a fixed width, so the length does not depend on its value.
    json_len = len(state_json(placeholder, 0.0 if double_quant else None))
    out = [PlannedTensor(name, "U8", ((n + 1) // 2, 1))]
    out.append(PlannedTensor(name + ".absmax", "U8" if double_quant else "F32", (blocks,)))
    out.append(PlannedTensor(name + ".quant_map", "F32", (16,)))
    if double_quant:
        out.append(PlannedTensor(name + ".nested_absmax", "F32", (-(blocks // -NESTED_BLOCKSIZE),)))
        out.append(PlannedTensor(name + ".nested_quant_map", "F32", (256,)))
    out.append(PlannedTensor(state_key(name, quant_type), "U8", (json_len,)))
    return out


def state_tensors(name: str, packed: torch.Tensor, state: QuantState) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) for a quantized weight, as transformers saves it (planned_entries' order)."""
    offset = float(state.offset) if state.double_quant else None
    out = [(name, packed), (name + ".absmax", state.absmax), (name + ".quant_map", state.code)]
    if state.double_quant:
        out += [
            (name + ".nested_absmax", state.nested_absmax),
            (name + ".nested_quant_map", state.nested_code),
        ]
    js = state_json(state, offset)
    out.append((state_key(name, state.quant_type), torch.tensor(list(js), dtype=torch.uint8)))
    return out


def quantization_config(
    compute_dtype: torch.dtype, quant_type: str, double_quant: bool, skip_modules: list[str] | None
) -> dict:
    """config.json's quantization_config, as transformers writes it for BitsAndBytesConfig(load_in_4bit=True)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtypes.config_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
