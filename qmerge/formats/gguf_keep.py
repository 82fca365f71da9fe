"""`--keep-delta FRACTION` for a calibrated GGUF: the layers whose LoRA delta calibration still could not keep
(delta retention below FRACTION) rewritten at Q8_0 (F16 where rows are not whole 32-weight blocks), and the
size this costs reported.

The calibrated file is complete first (its per-layer retention is known only then); the rewrite copies its
metadata and every other tensor's bytes unchanged (gguf-py's reader and writer, as its gguf_new_metadata
script does), one tensor at a time, and re-encodes the kept layers from the merged weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io.gguf.families import architecture_of
from ..io.gguf.writer import encode, map_tensors
from ..pipeline.source import Source
from ..pipeline.stream import merged_tensor
from .nf4 import Retention


def keep_delta(source: Source, path: Path, retention: dict | None, fraction: float) -> dict:
    """Rewrite the GGUF at `path` (in place, through a temporary beside it) with the layers whose `retention`
    (the export's delta_retention) is below `fraction` at Q8_0. Returns the report: the threshold, each kept
    layer's retention before and after and its type, the bytes added and their share of the file."""
    import gguf

    layers = (retention or {}).get("layers", {})
    chosen = sorted(n for n, r in layers.items() if r["kept"] < fraction)
    report = {"threshold": fraction, "layers": {}, "bytes_added": 0, "size_increase": 0.0}
    if not chosen:
        return report
    arch, hp = architecture_of(source.config)
    mapped = {t.name: t for t in map_tensors(arch, hp, {n: source.tensors[n].shape for n in chosen}, "q8_0")}
    before = path.stat().st_size
    tmp = path.with_name(path.name + ".keep")
    reader = gguf.GGUFReader(str(path))
    try:
        planned = []  # (name, stored shape, dtype, type, the data when it is written): one tensor in memory
        for t in reader.tensors:
            if t.name not in mapped:
                planned.append((t.name, t.data.shape, t.data.dtype, t.tensor_type, lambda t=t: t.data))
                continue
            qtype = _kept_type(int(t.shape[0]))
            shape = gguf.quant_shape_to_byte_shape(tuple(int(d) for d in reversed(t.shape)), qtype)

            def encoded(g=mapped[t.name], shape=shape, qtype=qtype):
                data, kept = _kept_layer(source, g, arch, hp, qtype)
                report["layers"][g.hf_name] = {
                    "kept_before": layers[g.hf_name]["kept"],
                    "kept_after": kept,
                    "type": qtype.name,
                }
                return data.reshape(shape)

            planned.append((t.name, shape, np.dtype(np.uint8), qtype, encoded))
        _write(tmp, reader, planned)
        del reader, planned
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    report["bytes_added"] = path.stat().st_size - before
    report["size_increase"] = report["bytes_added"] / before
    return report


def _write(path: Path, reader, planned: list) -> None:
    """A GGUF at `path` with `reader`'s metadata and the planned tensors, written one at a time."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=str(reader.fields["general.architecture"].contents()))
    _copy_fields(reader, writer)
    for name, shape, dtype, qtype, _ in planned:
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for *_, data in planned:
        writer.write_tensor_data(data())
    writer.close()


def _copy_fields(reader, writer) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _kept_type(columns: int):
    import gguf

    return gguf.GGMLQuantizationType.Q8_0 if columns % 32 == 0 else gguf.GGMLQuantizationType.F16


def _kept_layer(source: Source, tensor, arch, hp, qtype) -> tuple[np.ndarray, float]:
    """(the bytes of the merged layer as llama.cpp holds it in `qtype`, the delta retention they give)."""
    import gguf

    t = merged_tensor(source, tensor.hf_name, keep_base=True)
    W = arch.transform(tensor.hf_name, t.value.float(), hp)
    data = encode(W, qtype)
    Q = torch.from_numpy(gguf.quants.dequantize(data.reshape(W.shape[0], -1), qtype).astype(np.float32))
    kept = Retention()
    kept.add(tensor.hf_name, arch.transform(tensor.hf_name, t.base.float(), hp), W, Q)
    return data, kept.layers.get(tensor.hf_name, {"kept": 1.0})["kept"]
