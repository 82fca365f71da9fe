"""`qmerge export --to gguf --gguf-type iq4_xs|iq4_nl|q4_0|q4_k_m --calibrate FILE`: a 4-bit GGUF whose codes
keep the fine-tune, encoded by qmerge in llama.cpp's own block formats (quant/ggml4.py, quant/kquants.py).

IQ4_XS, IQ4_NL, Q4_0: the layers that were 4-bit in training get blocks of that type, the other matrices
(embeddings, the output layer) Q8_0, 1-D tensors F32. Q4_K_M: llama.cpp's quantizer writes its own file
first (its mix of Q4_K and Q6_K, every tensor), then qmerge chooses again, in place and at the same size, the
blocks of the layers that were 4-bit in training. Either way each block's scale (and minimum) is chosen as
llama.cpp's quantizer chooses it with an importance matrix (the mean squared activation of each input column
on the calibration data), then the codes with GPTQ error feedback against that layer's inputs. One streamed
forward pass of the merged model hands each layer its inputs, as for calibrated NF4 (calibration.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UnsupportedError
from ..io.atomic import OutputFile, atomic_file, describe_files
from ..io.gguf.families import architecture_of
from ..io.gguf.imatrix import write_imatrix
from ..io.gguf.rope import rope_tensors
from ..io.gguf.vlm import note_text_only
from ..io.gguf.writer import (
    LLAMA_CPP_TYPES,
    GGUFFile,
    GGUFTensor,
    encode,
    gguf_head,
    map_tensors,
    not_written_by_qmerge,
)
from ..pipeline.source import Source
from ..pipeline.steps import plan_steps
from ..pipeline.stream import Progress, merged_tensor, merged_tensors
from ..quant import ggml4, kquants
from ..quant.gptq import Hessian, gptq_codes
from ..reports import WriteReport
from .calibration import OutputErrors, calibrate, calibration_inputs, module_order
from .gguf import OWN_CALIBRATED_TYPES, TensorTypes, file_types, type_counts
from .gguf_meta import gguf_metadata
from .nf4 import Retention

# types of llama.cpp's own file, the 4-bit layers' blocks chosen again: Q4_K/Q5_K/Q6_K by qmerge (GPTQ), the others
# by llama.cpp's quantizer with the importance matrix
KQUANT_TYPES = tuple(t for t in LLAMA_CPP_TYPES if t not in OWN_CALIBRATED_TYPES)
# GGML types whose llama.cpp quantizer takes an importance matrix (ggml-quants.c's quantize_* with quant_weights)
_IMPORTANCE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}


def _types(kind: str, in_features: int):
    """The GGML type a layer 4-bit in training gets: IQ4_XS needs rows of whole 256-weight super-blocks and
    falls back to IQ4_NL (as llama.cpp's quantizer does); rows not of whole 32-weight blocks stay Q8_0's
    fallback (F16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if kind == "iq4_xs" and in_features % ggml4.SUPER == 0:
        return T.IQ4_XS
    if in_features % ggml4.BLOCK:
        return None
    return {"iq4_xs": T.IQ4_NL, "iq4_nl": T.IQ4_NL, "q4_0": T.Q4_0}[kind]


class CalibratedGGUF:
    """The calibrated GGUF of one source: its tensors, and the 4-bit layers encoded as inputs arrive. With
    `types` (GGUF name -> type of llama.cpp's own file), the 4-bit layers of a type that takes importance."""

    def __init__(self, source: Source, kind: str, base_only: bool = False, types: dict | None = None):
        self.source, self.kind, self.base_only = source, kind, base_only
        self.arch, self.hp = architecture_of(source.config)
        note_text_only(self.arch, source)
        four = source.weights.quantized_names()
        mapped = map_tensors(self.arch, self.hp, {n: s.shape for n, s in source.tensors.items()}, "q8_0")
        if stacked := [t for t in mapped if t.parts or t.piece is not None]:
            parts = len(stacked[0].parts)
            what = f"holds {parts} stored tensors as one" if parts else "is reshaped for llama.cpp"
            raise UnsupportedError(
                f"--calibrate does not write {self.arch.gguf_arch} models ({stacked[0].name} {what}); export it "
                "without --calibrate (llama.cpp quantizes it)."
            )
        if types is not None:
            mapped = [dataclasses.replace(t, qtype=types[t.name]) for t in mapped]
            self.quantized = {t.hf_name for t in mapped if t.hf_name in four and t.qtype.name in _IMPORTANCE}
        else:
            self.quantized = {t.hf_name for t in mapped if t.hf_name in four and _types(kind, t.shape[-1])}
            mapped = [
                dataclasses.replace(t, qtype=_types(kind, t.shape[-1])) if t.hf_name in self.quantized else t
                for t in mapped
            ]
        self.tensors = mapped
        self._by_name = {t.hf_name: t for t in self.tensors}
        self.retention, self.errors = Retention(), OutputErrors()
        self.tokens = 0  # calibration tokens, set before the pass
        self.importance: dict[str, np.ndarray] = {}  # GGUF name -> summed squared inputs (imatrix)

    def layout(self, forward_order: list[str]) -> tuple[list[GGUFTensor], list[str]]:
        """(every GGUF tensor in file order: the plain ones, then the 4-bit ones in forward order; the
        4-bit weights' names in that order)."""
        fourbit = [n for n in forward_order if n in self.quantized]
        fourbit += sorted(self.quantized - set(fourbit))
        plain = [t for t in self.tensors if t.hf_name not in self.quantized]
        return plain + [self._by_name[n] for n in fourbit], fourbit

    def encode_plain(self, name: str, value: torch.Tensor, base: torch.Tensor | None) -> np.ndarray:
        if self.base_only and base is not None:
            value = base
        return encode(self.arch.transform(name, value, self.hp), self._by_name[name].qtype, name)

    def quantize(self, name: str, hessian: Hessian | None) -> list[tuple[str, np.ndarray]]:
        """The blocks of 4-bit weight `name`: scales weighted by H's diagonal, codes chosen against H
        (llama.cpp's unweighted scales and plain rounding without one)."""
        t = merged_tensor(self.source, name, keep_base=True)
        value = t.base if self.base_only and t.base is not None else t.value
        W = self.arch.transform(name, value.float(), self.hp)  # Q/K rows as llama.cpp holds them
        H = None if hessian is None else hessian.H
        data, Q, rounded = self._encode(name, W, hessian)
        if t.base is not None and not self.base_only:  # one row permutation on both sides: no change
            self.retention.add(name, self.arch.transform(name, t.base.float(), self.hp), W, Q)
        if H is not None:
            self.errors.add(name, Q - W, rounded - W, H)
            self.importance[self._by_name[name].name] = (torch.diag(H).double() * self.tokens).numpy()
        return [(self._by_name[name].name, data)]

    def _encode(self, name: str, W: torch.Tensor, hessian: Hessian | None):
        """(the tensor's bytes, the values they decode to, the values of plain rounding): qmerge's GPTQ codes
        on its own grid, or, for a type qmerge does not encode, llama.cpp's quantizer with the importance."""
        imp = None if hessian is None else torch.diag(hessian.H)
        qtype = self._by_name[name].qtype
        if qtype.name not in kquants.GRIDS and qtype.name not in ggml4.TYPES:
            import gguf

            from .. import llama_cpp

            data = llama_cpp.quantize_rows(int(qtype), W.numpy(), None if imp is None else imp.numpy())
            plain = data if imp is None else llama_cpp.quantize_rows(int(qtype), W.numpy())
            decode = lambda d: torch.from_numpy(gguf.quants.dequantize(d.reshape(len(W), -1), qtype))  # noqa: E731
            return data, decode(data), decode(plain)
        grid = self._grid(name, W, imp)
        rounded = grid.round(W)
        codes = rounded
        if hessian is not None:
            codes = gptq_codes(W, hessian, grid.values, grid.scale, grid.block, offset=grid.offset)
        return grid.encode(codes).numpy(), grid.dequantize(codes), grid.dequantize(rounded)

    def _grid(self, name: str, W: torch.Tensor, importance: torch.Tensor | None) -> kquants.Grid:
        """The values, block scales (and minimums) the codes of `name` are chosen against, and its bytes."""
        qtype = self._by_name[name].qtype.name
        if qtype in kquants.GRIDS:
            return kquants.GRIDS[qtype](W, importance)
        kind = qtype.lower()  # IQ4_NL, Q4_0 (also where llama.cpp's file has them), IQ4_XS
        values = ggml4.VALUES[kind]
        if qtype != "IQ4_XS":
            scale = ggml4.block_scales(W, importance, kind)
            return kquants.Grid(values, ggml4.BLOCK, scale, None, lambda c: ggml4.encode_blocks(c, scale))
        d, steps = ggml4.superblock_scales(ggml4.block_scales(W, importance, kind, fp16=False))
        scale = ggml4.effective_scales(d, steps)
        return kquants.Grid(values, ggml4.BLOCK, scale, None, lambda c: ggml4.encode_superblocks(c, d, steps))

    def summary(self, tokens: int) -> dict:
        blocks = f"llama.cpp's {self.kind.upper()} blocks"
        if self.kind in KQUANT_TYPES:
            blocks = (
                f"the Q4_K/Q5_K/Q6_K blocks of llama.cpp's own {self.kind} file (its quantizer with the importance "
                "matrix for other types)"
            )
        summary = self.errors.summary(
            tokens,
            f"GPTQ error feedback in {blocks}, block scales chosen with the calibration's importance matrix first",
        )
        return summary | {"tensors": len(self.quantized)}


def write_calibrated_gguf(
    source: Source,
    out: Path,
    kind: str,
    calibration: Path,
    max_tokens: int = 8192,
    force: bool = False,
    progress: Progress | None = None,
    imatrix: Path | None = None,
    tensor_types: TensorTypes = TensorTypes(),
    keep: float | None = None,
) -> WriteReport:
    """Write the calibrated 4-bit GGUF of `source` at `out` (and its importance matrix at `imatrix`),
    atomically: each file is in place complete or not at all. With `keep`, the layers whose delta retention
    stays below it are rewritten at Q8_0 (gguf_keep.py)."""
    start = time.perf_counter()
    out = Path(out)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_file(out, force, source.inputs(), not_written_by_qmerge))
        mat = None
        if imatrix is not None:
            mat = stack.enter_context(
                atomic_file(Path(imatrix), force, source.inputs(), not_written_by_qmerge)
            )
        digests, details = calibrated_gguf_file(
            source, tmp, kind, calibration, max_tokens, progress, imatrix=mat, tensor_types=tensor_types
        )
        if keep is not None:
            from .gguf_keep import keep_delta

            details["keep_delta"] = keep_delta(source, tmp, details.get("delta_retention"), keep)
            if details["keep_delta"]["layers"]:
                digests, details["tensor_types"] = {}, file_types(tmp)
        files = [OutputFile(out.name, f.bytes, f.sha256) for f in describe_files(tmp, digests)]
        if mat is not None:
            files += [OutputFile(Path(imatrix).name, f.bytes, f.sha256) for f in describe_files(mat)]
    merged = len(source.layout.lora) + len(source.layout.replace)
    return WriteReport(str(out), files, merged, time.perf_counter() - start, details)


def calibrated_gguf_file(
    source: Source,
    path: Path,
    kind: str,
    calibration: Path,
    max_tokens: int = 8192,
    progress: Progress | None = None,
    base_only: bool = False,
    imatrix: Path | None = None,
    tensor_types: TensorTypes = TensorTypes(),
) -> tuple[dict, dict]:
    """Write the calibrated GGUF at `path` (no atomicity: the caller's): ({file name: sha256}, details).
    With base_only, the file holds the weights training saw (for a LoRA GGUF on top), calibrated on the
    inputs each layer receives in the fine-tuned model. With `imatrix`, the importance matrix of the
    calibration goes there too (also the caller's to make atomic)."""
    if kind in KQUANT_TYPES:
        from .gguf_kquant import kquant_file, llama_cpp_file

        quantized = llama_cpp_file(source, path, kind, progress, base_only, tensor_types)
        return kquant_file(
            source, path, kind, quantized, calibration, max_tokens, progress, base_only, imatrix
        )
    cal = CalibratedGGUF(source, kind, base_only)
    model, tokens, mask = calibration_inputs(source, calibration, max_tokens, torch.float32)
    cal.tokens = int(mask.sum())
    digests, tokenizer_kind = _write_file(path, cal, model, tokens, mask, progress)
    return digests, details_of(cal, kind, tokenizer_kind, calibration, imatrix)


def details_of(cal: CalibratedGGUF, kind: str, tokenizer_kind: str, calibration: Path, imatrix) -> dict:
    """The importance matrix written (with one asked for) and the export's details."""
    if imatrix is not None:
        write_imatrix(imatrix, cal.arch.gguf_arch, cal.importance, cal.tokens, str(Path(calibration).name))
    counts = type_counts(t.qtype for t in cal.tensors)
    details = {"gguf_type": kind, "gguf_architecture": cal.arch.gguf_arch, "tensor_types": counts}
    details |= {"tokenizer": tokenizer_kind, "calibration": cal.summary(cal.tokens)}
    if cal.retention.summary():
        details["delta_retention"] = cal.retention.summary()
    return details


def _write_file(path: Path, cal: CalibratedGGUF, model, tokens, mask, progress) -> tuple[dict, str]:
    """The header, the rotary factors, the plain tensors, then the 4-bit layers as the forward reaches them:
    ({file name: sha256}, tokenizer kind)."""
    tensors, fourbit = cal.layout(module_order(model))
    extra = rope_tensors(cal.arch, cal.hp)
    scratch = path.with_name(path.name + ".head")
    head, align, tokenizer_kind = gguf_head(
        cal.arch,
        cal.hp,
        tensors,
        extra,
        cal.kind,
        gguf_metadata(cal.source, cal.kind, cal.source.gguf_name),
        cal.source.tokenizer_dir,
        scratch,
    )
    sink = GGUFFile(path, head, align)
    try:
        for extra_name, values in extra:
            sink.write(extra_name, values.reshape(-1).view(np.uint8))
        _write_plain(sink, cal, [t.hf_name for t in tensors if t.hf_name not in cal.quantized])
        calibrate(sink, model, cal, fourbit, tokens, mask, progress)
        return sink.close(), tokenizer_kind
    except BaseException:
        sink.abort()
        raise


def _write_plain(sink: GGUFFile, cal: CalibratedGGUF, names: list[str]) -> None:
    dts = {n: torch.float32 if cal.source.tensors[n].floating else None for n in names}
    for t in merged_tensors(
        cal.source, plan_steps(cal.source, dts, cal.base_only), dts, names, cal.base_only
    ):
        data = cal.encode_plain(t.name, t.value, t.base)
        sink.wait_for_room(data.nbytes)
        sink.write(t.name, data)
