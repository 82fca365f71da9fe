"""What every calibrated export shares: calibration tokens from the user's data, the output error a
quantization leaves on those inputs, and the one forward pass that hands each 4-bit layer its inputs.

A format plugs in an object with `quantize(name, H) -> [(key, data), ...]` (H the layer's input Hessian, None
for a layer the pass never reached: rounded plainly) and a sink with `write(key, data)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..data import encode_record, read_jsonl
from ..errors import InputError
from ..quant.gptq import layer_hessian


class Quantizer(Protocol):
    quantized: set[str]

    def quantize(self, name: str, H: torch.Tensor | None) -> list: ...


class OutputErrors:
    """The output error of the calibrated codes against plain rounding, per layer and in total."""

    def __init__(self):
        self.layers: dict[str, dict] = {}
        self.calibrated = self.rounding = 0.0

    def add(self, name: str, calibrated: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> None:
        """`calibrated`, `rounded`: each quantized weight minus the weight, [out, in]."""
        e_c, e_r = output_error(calibrated, H), output_error(rounded, H)
        self.calibrated += e_c
        self.rounding += e_r
        self.layers[name] = {"output_error_vs_rounding": e_c / e_r if e_r else 1.0}

    def summary(self, tokens: int, method: str) -> dict:
        r = self.rounding
        return {
            "method": method,
            "tokens": tokens,
            "output_error_vs_rounding": self.calibrated / r if r else 1.0,
            "layers": self.layers,
        }


def calibration_tokens(path: Path, tokenizer, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [n, L] right-padded, mask of real tokens) from JSONL records (the formats qmerge train
    reads, whole sequences) or plain text, at most max_tokens real tokens."""
    text = Path(path).read_text(encoding="utf-8", errors="strict") if Path(path).suffix != ".jsonl" else None
    if text is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        seqs = [ids[i : i + 512] for i in range(0, len(ids), 512)]
    else:
        seqs, total = [], 0
        for i, row in enumerate(read_jsonl(path), 1):
            ids = encode_record(row, tokenizer, 2048, f"{path}:{i}")["input_ids"]
            seqs.append(ids[: max_tokens - total])
            total += len(seqs[-1])
            if total >= max_tokens:
                break
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise InputError(f"{path}: no calibration tokens (empty file, or records without text).")
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
    return tokens, mask


def output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """mean over calibration inputs x of ||D x||^2 = trace(D H D^T), for D [out, in], H = X^T X / n."""
    return float(((D.double() @ H.double()) * D.double()).sum())


def module_order(model) -> list[str]:
    """Weight names of the model's Linear / Conv1D modules in registration order (the forward's order)."""
    return [f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]


def calibrate(sink, model, cal: Quantizer, order: list[str], tokens, mask, progress) -> None:
    """One forward pass; each 4-bit layer is quantized when its input arrives and written in `order`
    (a layer that arrives early waits; one the pass never reaches is rounded plainly at the end)."""
    pending: dict[str, list] = {}
    position = {"next": 0}

    def flush() -> None:
        while position["next"] < len(order) and order[position["next"]] in pending:
            for key, t in pending.pop(order[position["next"]]):
                sink.write(key, t)
            position["next"] += 1

    def hook(name: str):
        def pre(module, args):
            if name in pending or position["next"] > order.index(name):
                return  # a module called twice (shared weights): its first input decides
            if progress:
                progress(name, order.index(name), len(order))
            pending[name] = cal.quantize(name, layer_hessian(args[0][mask]))
            flush()

        return pre

    handles = [
        m.register_forward_pre_hook(hook(f"{n}.weight"))
        for n, m in model.named_modules()
        if f"{n}.weight" in cal.quantized
    ]
    try:
        with torch.no_grad():
            model(input_ids=tokens, attention_mask=mask.long(), logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    for name in order[position["next"] :]:
        pending.setdefault(name, cal.quantize(name, None))
        flush()
