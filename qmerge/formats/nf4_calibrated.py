"""`qmerge export --to nf4 --calibrate FILE`: the merged model's 4-bit layers requantized with error feedback
on calibration data (GPTQ with bitsandbytes' static block scales, quant/gptq.py), written exactly as
transformers saves a bitsandbytes 4-bit model.

One forward pass of the merged model (streamed, one module's weights at a time) over the calibration tokens:
as each 4-bit layer receives its input, its Hessian is formed from that input, the layer's merged weight is
quantized against it, and its tensors go to the writer; memory is one layer's weights and Hessian and the
calibration activations. The other tensors are written first, as the plain NF4 export writes them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import dtypes
from ..io.atomic import atomic_dir, describe_files
from ..io.bnb import planned_entries, quantization_config, state_tensors
from ..io.hf_dir import ShardedSafetensors, copy_side_files, not_written_by_qmerge, output_config, parse_size
from ..io.records import PROVENANCE, write_json
from ..io.safetensors import DTYPE_NAMES, PlannedTensor
from ..pipeline.source import Source
from ..pipeline.steps import plan_steps
from ..pipeline.stream import Progress, merged_tensor, merged_tensors
from ..quant.blockwise import dequantize_4bit, quantize_4bit
from ..quant.gptq import Hessian, gptq_4bit
from ..reports import WriteReport
from .calibration import OutputErrors, calibrate, calibration_inputs, module_order
from .nf4 import NF4Options, Retention
from .write import DEFAULT_MAX_SHARD, data_file, provenance_of


class Calibrated:
    """The calibrated NF4 export of one source: its layout, and the layers quantized as inputs arrive."""

    def __init__(self, source: Source, opts: NF4Options):
        self.source, self.opts = source, opts
        self.dtype = dtypes.option_dtype(opts.compute_dtype)
        self.quantized = source.weights.quantized_names()
        self.retention = Retention()
        self.errors = OutputErrors()

    def layout(self, module_order: list[str]) -> tuple[list[str], list[str], list[PlannedTensor]]:
        """(plain tensors, 4-bit weights in forward order, the planned file entries in that order)."""
        o, specs = self.opts, self.source.tensors
        plain = [n for n in specs if n not in self.quantized]
        fourbit = [n for n in module_order if n in self.quantized] + sorted(
            self.quantized - set(module_order)
        )
        entries = [
            PlannedTensor(
                n, DTYPE_NAMES[self.dtype if specs[n].floating else specs[n].stored], specs[n].shape
            )
            for n in plain
        ]
        for n in fourbit:
            shape = tuple(reversed(specs[n].shape)) if n in self.source.conv1d else specs[n].shape
            entries += planned_entries(n, shape, o.blocksize, o.double_quant, o.quant_type, self.dtype)
        return plain, fourbit, entries

    def quantize(self, name: str, hessian: Hessian | None) -> list[tuple[str, torch.Tensor]]:
        """The tensors of 4-bit weight `name`, its codes chosen against its inputs' Hessian (plain rounding
        without one)."""
        o, t = self.opts, merged_tensor(self.source, name, keep_base=True)
        value, base = t.value, t.base
        if name in self.source.conv1d:  # bitsandbytes holds a Conv1D weight transposed
            value, base = value.T.contiguous(), None if base is None else base.T.contiguous()
        W = value.to(self.dtype)
        rtn = quantize_4bit(W, o.blocksize, o.quant_type, o.double_quant)
        packed, state = rtn
        if hessian is not None:
            packed, state = gptq_4bit(W, hessian, o.blocksize, o.quant_type, o.double_quant)
        Q = dequantize_4bit(packed, state).float()
        if base is not None:
            self.retention.add(name, base, value, Q)
        if hessian is not None:
            self.errors.add(name, Q - value, dequantize_4bit(*rtn).float() - value, hessian.H)
        return state_tensors(name, packed, state)

    def summary(self, tokens: int) -> dict:
        return self.errors.summary(
            tokens, "GPTQ error feedback, bitsandbytes' block scales fixed first (double-quantized)"
        )


def write_calibrated_nf4(
    source: Source,
    out: Path,
    calibration: Path,
    opts: NF4Options = NF4Options(),
    max_tokens: int = 8192,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    force: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Write the calibrated NF4 export of `source` at `out`, atomically."""
    start = time.perf_counter()
    cal = Calibrated(source, opts)
    model, tokens, mask = calibration_inputs(source, calibration, max_tokens, cal.dtype)
    plain, fourbit, entries = cal.layout(module_order(model))
    with atomic_dir(Path(out), force, source.inputs(), not_written_by_qmerge) as tmp:
        sink = ShardedSafetensors(tmp, entries, parse_size(max_shard_size))
        try:
            _write_plain(sink, source, plain, cal.dtype)
            calibrate(sink, model, cal, fourbit, tokens, mask, progress)
            digests = sink.close()
        except BaseException:
            sink.abort()
            raise
        _finish(tmp, source, cal, calibration, int(mask.sum()))
        files = describe_files(tmp, digests)
    details = {"calibration": cal.summary(int(mask.sum()))}
    if cal.retention.summary():
        details["delta_retention"] = cal.retention.summary()
    return WriteReport(
        str(out),
        files,
        len(source.layout.lora) + len(source.layout.replace),
        time.perf_counter() - start,
        details,
    )


def _write_plain(sink, source: Source, names: list[str], dtype: torch.dtype) -> None:
    dts = {n: dtype if source.tensors[n].floating else None for n in names}
    for t in merged_tensors(source, plan_steps(source, dts), dts, names):
        sink.wait_for_room(t.value.numel() * t.value.element_size())
        sink.write(t.name, t.value)


def _finish(tmp: Path, source: Source, cal: Calibrated, calibration: Path, tokens: int) -> None:
    """config.json with quantization_config, tokenizer files, provenance."""
    cfg = output_config(source.config, cal.dtype)
    skip = (source.base.quantization_config or {}).get("llm_int8_skip_modules")
    cfg["quantization_config"] = quantization_config(
        cal.dtype, cal.opts.quant_type, cal.opts.double_quant, skip
    )
    write_json(tmp / "config.json", cfg)
    copy_side_files(tmp, source.base, source.adapter.path if source.adapter else None)
    prov = provenance_of(
        source, {"export": "nf4", "nf4": cal.opts.__dict__, "calibration": data_file(calibration)}
    )
    prov["calibration"] = cal.summary(tokens)
    if cal.retention.summary():
        prov["delta_retention"] = cal.retention.summary()
    write_json(tmp / PROVENANCE, prov)
