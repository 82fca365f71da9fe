"""Deployment formats: plain safetensors (bf16/fp16/fp32), requantized NF4, and GGUF."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import UnsupportedError
from ..io.output import atomic_dir, atomic_file, describe_files
from ..io.safetensors_io import PlannedTensor
from ..merge import (
    DEFAULT_MAX_SHARD,
    DTYPES,
    WriteReport,
    copy_side_files,
    output_config,
    provenance,
    write_merged_dir,
    write_sharded,
)
from ..plan import MergedTensor, Progress, QLoRACheckpoint, QuantSettings, open_source
from .gguf_file import DIRECT_TYPES, K_QUANTS, quantize_with_llama_cpp, supported_types, write_gguf
from .nf4 import NF4Options, Retention, dtype_name, planned_entries, quantization_config, requantize

__all__ = ["NF4Options", "export", "export_nf4", "export_gguf"]


def export(
    source: Path,
    to: str,
    out: Path,
    base: Path | None = None,
    gguf_type: str = "f16",
    merge_base: str = "dequantized",
    quant: QuantSettings | None = None,
    nf4: NF4Options = NF4Options(),
    max_shard_size: int = DEFAULT_MAX_SHARD,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Export SOURCE (a QLoRA checkpoint, merged on the fly, or a merged directory) to one format."""
    gguf_type = gguf_type.lower()
    if to == "gguf" and gguf_type not in DIRECT_TYPES + K_QUANTS:
        raise UnsupportedError(
            f"GGUF type {gguf_type!r} is not supported; choose one of: {supported_types()}."
        )
    if to not in ("bf16", "fp16", "fp32", "nf4", "gguf"):
        raise UnsupportedError(f"unknown export format {to!r}: choose bf16, fp16, fp32, nf4 or gguf.")
    ckpt = open_source(Path(source), Path(base) if base else None, quant, merge_base, allow_pickle)
    if to in DTYPES:
        return write_merged_dir(ckpt, Path(out), DTYPES[to], max_shard_size, force, progress, {"export": to})
    if to == "nf4":
        return export_nf4(ckpt, Path(out), nf4, max_shard_size, force, progress)
    return export_gguf(ckpt, Path(out), gguf_type, force, progress)


def export_nf4(
    ckpt: QLoRACheckpoint,
    out: Path,
    opts: NF4Options = NF4Options(),
    max_shard_size: int = DEFAULT_MAX_SHARD,
    force: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Requantize the merged weights with qmerge's codec and write a bitsandbytes 4-bit checkpoint."""
    start = time.perf_counter()
    dtype = DTYPES[opts.compute_dtype]
    plan = ckpt.plan()
    quantized = ckpt.quantized_names()
    names = sorted(plan.shapes)
    entries: list[PlannedTensor] = []
    for name in names:
        if name in quantized:
            shape = plan.shapes[name]  # a Conv1D weight is quantized transposed, as transformers does
            entries += planned_entries(
                name, tuple(reversed(shape)) if name in ckpt.conv1d else shape, opts, dtype
            )
        else:
            stored = dtype if plan.floating[name] else ckpt.base.store.dtype(name)
            entries.append(PlannedTensor(name, dtype_name(stored), tuple(plan.shapes[name])))
    retention = Retention()
    merged = 0

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal merged
        for t in ckpt.iter_tensors(names, progress, keep_base=True):
            merged += t.merged
            if t.name in quantized:
                if t.name in ckpt.conv1d:
                    t = MergedTensor(
                        t.name,
                        t.value.T.contiguous(),
                        None if t.base is None else t.base.T.contiguous(),
                        t.merged,
                    )
                yield from requantize(t, opts, dtype, retention)
            else:
                yield t.name, t.value.to(dtype) if plan.floating[t.name] else t.value

    with atomic_dir(out, force) as tmp:
        digests = write_sharded(tmp, entries, max_shard_size, produce())
        cfg = output_config(ckpt.config, dtype)
        skip = (ckpt.base.quantization_config or {}).get("llm_int8_skip_modules")
        cfg["quantization_config"] = quantization_config(opts, skip)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        copy_side_files(ckpt, tmp)
        summary = retention.summary()
        prov = provenance(ckpt, {"export": "nf4", "nf4": opts.__dict__})
        if summary:
            prov["delta_retention"] = summary
        (tmp / "qmerge_provenance.json").write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
        files_out = describe_files(tmp, digests)
    details = {"delta_retention": summary} if summary else {}
    return WriteReport(str(out), files_out, merged, time.perf_counter() - start, details)


def export_gguf(
    ckpt: QLoRACheckpoint,
    out: Path,
    gguf_type: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Write a GGUF file straight from the merged tensors; K-quants go through llama.cpp's quantizer."""
    start = time.perf_counter()
    plan = ckpt.plan()
    merged = 0

    def tensors(order, dtypes):
        nonlocal merged
        for t in ckpt.iter_tensors(order, progress, out_dtype=dtypes):
            merged += t.merged
            yield t.name, t.value

    name = (ckpt.adapter.path.name if ckpt.adapter else ckpt.base.path.name) or "model"
    tok_dir = _tokenizer_dir(ckpt)
    with atomic_file(out, force) as tmp:
        digests = {}
        if gguf_type in DIRECT_TYPES:
            summary = write_gguf(tmp, ckpt.config, tok_dir, plan.shapes, tensors, gguf_type, name)
            digests[tmp.name] = summary.pop("sha256")
        else:
            # llama.cpp quantizes from a GGUF file: write an f32 one beside the output first (bf16 beyond
            # 3B parameters, to bound the disk it takes), then let its quantizer pick the K-quant mixes.
            n_params = sum(torch.Size(s).numel() for s in plan.shapes.values())
            inter = "f32" if n_params < 3e9 else "bf16"
            with tempfile.TemporaryDirectory(dir=Path(out).parent or ".", prefix=".qmerge-gguf-") as td:
                mid = Path(td) / "intermediate.gguf"
                summary = write_gguf(mid, ckpt.config, tok_dir, plan.shapes, tensors, inter, name)
                del summary["sha256"]
                quantize_with_llama_cpp(mid, tmp, gguf_type)
                summary = {**summary, "intermediate": inter, "tensor_types": _gguf_types(tmp)}
        files = describe_files(tmp, digests)
    files = [f.__class__(Path(out).name, f.bytes, f.sha256) for f in files]
    return WriteReport(
        str(out), files, merged, time.perf_counter() - start, {"gguf_type": gguf_type, **summary}
    )


def _gguf_types(path: Path) -> dict:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _tokenizer_dir(ckpt: QLoRACheckpoint) -> Path:
    if ckpt.adapter is not None and (
        (ckpt.adapter.path / "tokenizer.json").exists() or (ckpt.adapter.path / "tokenizer.model").exists()
    ):
        return ckpt.adapter.path
    return ckpt.base.path
