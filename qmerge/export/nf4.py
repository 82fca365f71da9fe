"""Requantize merged weights to NF4/FP4 and write them exactly as transformers saves a bnb 4-bit model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..io.safetensors_io import DTYPE_NAMES, PlannedTensor
from ..plan import MergedTensor
from ..quant.blockwise import QuantState, dequantize_4bit, quantize_4bit
from ..quant.codebooks import NESTED_BLOCKSIZE

_STATE_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# The quant-state JSON carries nested_offset as a float repr of unknown length; it is padded with
# spaces to this many characters (json.loads ignores them) so the header can be written first.
_OFFSET_WIDTH = 26


@dataclass(frozen=True)
class NF4Options:
    """How to requantize: blocksize, double quant, and the dtype the layers compute (and store scales) in."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_type: str = "nf4"


@dataclass
class Retention:
    """How much of each layer's LoRA delta survives requantization."""

    layers: dict[str, dict] = field(default_factory=dict)
    dot: float = 0.0
    delta_sq: float = 0.0
    err_sq: float = 0.0

    def add(self, name: str, base: torch.Tensor, merged: torch.Tensor, requantized: torch.Tensor) -> None:
        delta = (merged - base).double()
        realized = (requantized - base).double()
        dsq = float((delta * delta).sum())
        if dsq == 0:
            return
        dot = float((realized * delta).sum())
        esq = float(((requantized - merged).double() ** 2).sum())
        self.layers[name] = {"kept": dot / dsq, "error_over_delta": (esq / dsq) ** 0.5}
        self.dot += dot
        self.delta_sq += dsq
        self.err_sq += esq

    def summary(self) -> dict | None:
        if not self.layers:
            return None
        worst = min(self.layers, key=lambda k: self.layers[k]["kept"])
        return {
            "definition": "kept = <Q - W0, delta> / ||delta||^2: the share of the LoRA delta, along its own "
            "direction, that the requantized weight Q still carries over the base W0 (1 = all, 0 = none)",
            "total": self.dot / self.delta_sq,
            "error_over_delta": (self.err_sq / self.delta_sq) ** 0.5,
            "worst_layer": worst,
            "worst": self.layers[worst]["kept"],
            "layers": self.layers,
        }


def state_json(state: QuantState, offset: float | None) -> bytes:
    """The packed quant-state JSON bitsandbytes writes (QuantState.as_dict(packed=True)), space-padded."""
    d = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _STATE_DTYPE[state.dtype],
        "shape": list(state.shape),
    }
    if offset is not None:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    raw = json.dumps(d)
    if offset is not None:
        raw += " " * (_OFFSET_WIDTH - len(repr(float(offset))))
    return raw.encode("utf-8")


def planned_entries(
    name: str, shape: tuple[int, ...], opts: NF4Options, dtype: torch.dtype
) -> list[PlannedTensor]:
    """The tensors one 4-bit weight becomes in the checkpoint, with exact sizes."""
    n = 1
    for d in shape:
        n *= d
    blocks = -(n // -opts.blocksize)
    placeholder = QuantState(
        torch.empty(0), tuple(shape), dtype, opts.blocksize, opts.quant_type, torch.empty(16)
    )
    # state_json pads nested_offset to a fixed width, so the length does not depend on its value.
    json_len = len(state_json(placeholder, 0.0 if opts.double_quant else None))
    out = [PlannedTensor(name, "U8", ((n + 1) // 2, 1))]
    out.append(PlannedTensor(name + ".absmax", "U8" if opts.double_quant else "F32", (blocks,)))
    out.append(PlannedTensor(name + ".quant_map", "F32", (16,)))
    if opts.double_quant:
        out.append(PlannedTensor(name + ".nested_absmax", "F32", (-(blocks // -NESTED_BLOCKSIZE),)))
        out.append(PlannedTensor(name + ".nested_quant_map", "F32", (256,)))
    out.append(PlannedTensor(f"{name}.quant_state.bitsandbytes__{opts.quant_type}", "U8", (json_len,)))
    return out


def requantize(
    t: MergedTensor, opts: NF4Options, dtype: torch.dtype, retention: Retention
) -> list[tuple[str, torch.Tensor]]:
    """Quantize one merged weight as bitsandbytes would after loading it in `dtype`; record delta retention."""
    loaded = t.value.to(dtype)
    packed, state = quantize_4bit(loaded, opts.blocksize, opts.quant_type, opts.double_quant)
    if t.base is not None:
        retention.add(t.name, t.base, t.value, dequantize_4bit(packed, state).float())
    offset = float(state.offset) if opts.double_quant else None
    js = state_json(state, offset)
    out = [(t.name, packed), (t.name + ".absmax", state.absmax), (t.name + ".quant_map", state.code)]
    if opts.double_quant:
        out += [
            (t.name + ".nested_absmax", state.nested_absmax),
            (t.name + ".nested_quant_map", state.nested_code),
        ]
    out.append(
        (f"{t.name}.quant_state.bitsandbytes__{opts.quant_type}", torch.tensor(list(js), dtype=torch.uint8))
    )
    return out


def quantization_config(opts: NF4Options, skip_modules: list[str] | None) -> dict:
    """config.json's quantization_config, as transformers writes it for BitsAndBytesConfig(load_in_4bit=True)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
            opts.compute_dtype
        ],
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": opts.quant_type,
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]
