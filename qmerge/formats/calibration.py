"""What every calibrated export shares: calibration tokens from the user's data, the output error a
quantization leaves on those inputs, and the one forward pass that hands each 4-bit layer its inputs.

A format plugs in an object with `quantize(name, hessian) -> [(key, data), ...]` (the layer's input Hessian,
shared by layers that read the same input; None for a layer the pass never reached: rounded plainly) and a
sink with `write(key, data)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..data import encode_record, read_jsonl
from ..errors import InputError
from ..quant.gptq import Hessian


class Quantizer(Protocol):
    quantized: set[str]

    def quantize(self, name: str, hessian: Hessian | None) -> list: ...


ERROR_ROWS = 512


class OutputErrors:
    """The output error of the calibrated codes against plain rounding, per layer and in total."""

    def __init__(self):
        self.layers: dict[str, dict] = {}
        self.calibrated = self.rounding = 0.0

    def add(self, name: str, calibrated: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> None:
        """`calibrated`, `rounded`: each quantized weight minus the weight, [out, in]. Measured on every k-th
        row (at most ERROR_ROWS rows, the same rows for both; totals scaled by k): an estimate that took
        a fifth of a 1.1B calibration when every row was measured."""
        step = -(-calibrated.shape[0] // ERROR_ROWS)
        e_c, e_r = output_error(calibrated[::step], H), output_error(rounded[::step], H)
        self.calibrated += e_c * step
        self.rounding += e_r * step
        self.layers[name] = {"output_error_vs_rounding": e_c / e_r if e_r else 1.0}

    def summary(self, tokens: int, method: str) -> dict:
        r = self.rounding
        return {
            "method": method,
            "tokens": tokens,
            "output_error_vs_rounding": self.calibrated / r if r else 1.0,
            "layers": self.layers,
        }


WINDOW = 512  # tokens a calibration sequence holds


def calibration_tokens(path: Path, tokenizer, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [n, L] right-padded, mask of real tokens), at most max_tokens real tokens: from JSONL
    records (the formats qmerge train reads), one sequence per record from its first token, as training and
    deployment see them (on the demo, KL 5e-3 against 3e-2 when the records were packed into windows); from
    plain text, windows of 512 tokens (the remainder left out when there is a full window, as GPTQ tools
    cut their text), all full, so that no padding mask is needed."""
    if Path(path).suffix != ".jsonl":
        try:
            text = Path(path).read_text(encoding="utf-8-sig", errors="strict")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{path}: not UTF-8 text (byte {e.start}); --calibrate takes UTF-8 text or JSONL records."
            ) from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        width = min(WINDOW, len(ids))
        seqs = [ids[i : i + width] for i in range(0, max(1, len(ids) // WINDOW) * width, width)]
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


def calibration_inputs(source, calibration: Path, max_tokens: int, dtype: torch.dtype):
    """(the merged model streamed in `dtype`, calibration token ids, their mask) for a calibrated export of
    `source`, tokenized with the model's own tokenizer."""
    from ..pipeline.model import load_tokenizer, streamed_merge

    tokenizer = load_tokenizer(source.tokenizer_dir, source.base.path)
    if tokenizer is None:
        raise InputError(f"{source.tokenizer_dir}: --calibrate needs the model's tokenizer (tokenizer.json).")
    tokens, mask = calibration_tokens(Path(calibration), tokenizer, max_tokens)
    return streamed_merge(source, dtype), tokens, mask


def output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """mean over calibration inputs x of ||D x||^2 = trace(D H D^T), for D [out, in], H = X^T X / n: the
    product in fp32, the sum in fp64."""
    D = D.float()
    return float(((D @ H.float()) * D).sum(dtype=torch.float64))


def module_order(model) -> list[str]:
    """Weight names of the model's Linear / Conv1D modules in registration order (the forward's order)."""
    return [f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]


def _stage(progress, order: list[str], i: int) -> None:
    """The stage named for the progress bar: "calibration: 3 of 12 layers (model.layers.0...)"; i = -1 before
    the forward pass reaches the first layer."""
    if progress:
        where = "the forward pass starts" if i < 0 else order[i].removesuffix(".weight")
        progress(f"calibration: {i + 1} of {len(order)} layers ({where})", max(i, 0), len(order))


def calibrate(sink, model, cal: Quantizer, order: list[str], tokens, mask, progress) -> None:
    """One forward pass; each 4-bit layer is quantized when its input arrives and written in `order`
    (a layer that arrives early waits; one the pass never reaches is rounded plainly at the end)."""
    pending: dict[str, list] = {}
    position = {"next": 0}
    last: list = [None, None]  # the last input seen and its Hessian

    def flush() -> None:
        while position["next"] < len(order) and order[position["next"]] in pending:
            for key, t in pending.pop(order[position["next"]]):
                sink.write(key, t)
            position["next"] += 1

    def hook(name: str):
        def pre(module, args):
            if name in pending or position["next"] > order.index(name):
                return  # a module called twice (shared weights): its first input decides
            _stage(progress, order, order.index(name))
            if args[0] is not last[0]:  # q/k/v (and gate/up) read one input: one Hessian, one inverse
                last[:] = [args[0], Hessian.of_inputs(args[0][mask])]
            pending[name] = cal.quantize(name, last[1])
            flush()

        return pre

    handles = [
        m.register_forward_pre_hook(hook(f"{n}.weight"))
        for n, m in model.named_modules()
        if f"{n}.weight" in cal.quantized
    ]
    _stage(progress, order, -1)
    try:
        with torch.no_grad():
            model(input_ids=tokens, attention_mask=None if mask.all() else mask.long(), logits_to_keep=1)
    finally:
        last.clear()
        for h in handles:
            h.remove()
    for name in order[position["next"] :]:
        pending.setdefault(name, cal.quantize(name, None))
        flush()
