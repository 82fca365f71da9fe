"""`qmerge export --to gguf-lora`: the adapter as a llama.cpp LoRA GGUF (llama.cpp's --lora, Ollama's
ADAPTER), beside a GGUF of the base weights training saw (any GGUF type) and an Ollama Modelfile.

llama.cpp scales every adapter tensor by adapter.lora.alpha / rank (the rank read from the tensor), one alpha
for the whole file, as llama.cpp's convert_lora_to_gguf.py writes it from the config's global lora_alpha.
qmerge writes alpha 1 and each module's own scaling times its rank into lora_b, so rsLoRA, rank_pattern and
alpha_pattern come out as PEFT computes them. lora_b rows get the base weight's Q/K permutation where the
architecture has one. DoRA, modules_to_save and LoRA on embeddings or biases have no form here: refused,
with the merge route named instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UnsupportedError
from ..io.atomic import atomic_dir, describe_files
from ..io.gguf.arch import Architecture, HParams
from ..io.gguf.families import architecture_of
from ..io.gguf.vlm import note_text_only
from ..io.gguf.writer import map_tensors
from ..io.records import PROVENANCE, write_json
from ..lora.scaling import module_scaling
from ..pipeline.source import Source
from ..pipeline.stream import Progress
from ..reports import WriteReport
from .gguf import TensorTypes, check_type, write_gguf_file
from .gguf_calibrated import calibrated_gguf_file
from .gguf_meta import gguf_metadata
from .modelfile import write_modelfile
from .write import data_file, provenance_of

ADAPTER_FILE, MODELFILE = "adapter.gguf", "Modelfile"


def refuse_unsupported(source: Source, arch: Architecture, hp: HParams) -> None:
    """What a llama.cpp LoRA adapter cannot carry, as one message that points to the merge route."""
    layout, why = source.layout, []
    if any(m.magnitude for m in layout.lora.values()):
        why.append("DoRA (a magnitude vector per module)")
    if layout.replace:
        why.append(f"whole tensors it replaces (modules_to_save: {sorted(layout.replace)[0]}, ...)")
    if layout.rows:
        why.append(f"trainable tokens (new rows of {sorted(layout.rows)[0]})")
    if any(m.kind == "embedding" for m in layout.lora.values()):
        why.append("LoRA on embeddings")
    if any(m.lora_B_bias for m in layout.lora.values()):
        why.append("LoRA biases")
    if source.settings.fan_in_fan_out:
        why.append("fan_in_fan_out layers")
    if layout.params:
        why.append(f"LoRA on parameters (target_parameters: {sorted(layout.params)[0]}, ...)")
    if pieces := sorted(m.weight for m in layout.lora.values() if arch.stack_of(m.weight, hp)):
        why.append(
            f"LoRA on single experts or projections ({pieces[0]}, ...: llama.cpp holds each layer's experts, "
            "and Gemma 3n's AltUp projections, as one tensor)"
        )
    if held := sorted(
        m.weight for m in layout.lora.values() if any(p in m.weight for p in arch.no_lora_gguf)
    ):
        why.append(f"LoRA on {held[0]}, ... (llama.cpp's {arch.gguf_arch} holds those tensors reordered)")
    if why:
        raise UnsupportedError(
            f"{source.adapter.path}: a llama.cpp LoRA adapter cannot carry {'; '.join(why)}. Merge instead: "
            "qmerge export ADAPTER --to gguf (the merged model in one GGUF)."
        )


def adapter_tensors(source: Source) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) of every lora_a / lora_b, in GGUF name order."""
    arch, hp = architecture_of(source.config)
    weights = {m.weight: m for m in source.layout.lora.values()}
    mapped = map_tensors(arch, hp, {n: source.tensors[n].shape for n in weights}, "f32")
    out = []
    for t in mapped:
        mod = weights[t.hf_name]
        A, B = source.adapter_tensor(mod.lora_A), source.adapter_tensor(mod.lora_B)
        B = B * (module_scaling(source.settings, mod.module) * A.shape[0])  # llama.cpp divides by the rank
        B = arch.transform(t.hf_name, B, hp)  # Q/K rows as the base weight's
        out += [(t.name + ".lora_a", A.contiguous().numpy()), (t.name + ".lora_b", B.contiguous().numpy())]
    return sorted(out, key=lambda x: x[0])


def write_adapter(source: Source, path: Path) -> None:
    import gguf

    arch, _ = architecture_of(source.config)
    w = gguf.GGUFWriter(str(path), arch.gguf_arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    gguf_metadata(source, "f32", source.gguf_name).set_gguf_meta_model(w)  # general.*, as the base GGUF's
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 1.0)
    w.add_string("qmerge.version", __version__)
    for name, array in adapter_tensors(source):
        w.add_tensor(name, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def not_written_by_qmerge(path: Path) -> str | None:
    """Why `path` is not a gguf-lora directory qmerge wrote (None when it is one)."""
    if not path.is_dir() or not (path / PROVENANCE).is_file():
        return f"it is not a directory with {PROVENANCE}"
    for p in path.iterdir():
        if not p.is_file() or not (
            p.name in (ADAPTER_FILE, MODELFILE, PROVENANCE) or p.name.startswith("base-")
        ):
            return f"it holds {p.name}, which qmerge does not write (move it first)"
    return None


def _modelfile(source: Source, tmp: Path, out: Path, base_name: str) -> dict:
    """Write tmp/Modelfile (FROM the base GGUF, ADAPTER the adapter, the chat template translated): its JSON."""
    chat = write_modelfile(
        tmp / MODELFILE, tmp / base_name, source.tokenizer_dir, f"./{ADAPTER_FILE}", f"./{base_name}"
    )
    if chat.template is None:
        source.warnings.append(f"{MODELFILE}: no TEMPLATE: {chat.reason}.")
    return {"path": str(out / MODELFILE), **chat.to_json()}


def write_gguf_lora(
    source: Source,
    out: Path,
    base_type: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
    calibrate: Path | None = None,
    calibration_tokens: int = 8192,
    tensor_types: TensorTypes = TensorTypes(),
) -> WriteReport:
    """Write OUT/adapter.gguf, OUT/base-TYPE.gguf (the base weights training saw) and OUT/Modelfile. With
    `calibrate`, the codes of the base's layers 4-bit in training are chosen with error feedback on the inputs its
    layers receive in the fine-tuned model."""
    start = time.perf_counter()
    base_type = check_type(base_type)
    # an architecture llama.cpp runs (else the route), before anything else
    arch, hp = architecture_of(source.config)
    note_text_only(arch, source)
    refuse_unsupported(source, arch, hp)
    base = Source(source.base, None, source.quant, "dequantized")
    base_name = f"base-{base_type}.gguf"
    with atomic_dir(Path(out), force, source.inputs(), not_written_by_qmerge) as tmp:
        write_adapter(source, tmp / ADAPTER_FILE)
        if calibrate is not None:
            digests, summary = calibrated_gguf_file(
                source,
                tmp / base_name,
                base_type,
                calibrate,
                calibration_tokens,
                progress,
                True,
                None,
                tensor_types,
            )
        else:
            _, digests, summary = write_gguf_file(base, tmp / base_name, base_type, progress, tensor_types)
        summary["modelfile"] = _modelfile(source, tmp, Path(out), base_name)
        prov = provenance_of(source, {"export": "gguf-lora", "base_gguf_type": base_type})
        if calibrate is not None:
            prov["calibration"] = {"data": data_file(calibrate), **summary["calibration"]}
        write_json(tmp / PROVENANCE, prov)
        files = describe_files(tmp, digests)
    details = {"gguf_type": base_type, "adapter": ADAPTER_FILE, "base": base_name, **summary}
    return WriteReport(str(out), files, len(source.layout.lora), time.perf_counter() - start, details)
