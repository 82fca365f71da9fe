"""Describe a base, an adapter, a merged model or a GGUF file without loading a model."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

import torch

from .errors import InputError, MismatchError
from .io.adapter import Adapter
from .io.hf_dir import ModelDir
from .io.kinds import path_kind
from .io.records import read_provenance
from .lora.scaling import module_rank_alpha, module_scaling
from .pipeline.base import QuantSettings
from .pipeline.fit import Problem, problems
from .pipeline.identity import confirm_base
from .pipeline.source import Source, quant_settings_for, resolve_base_path
from .quant.codebooks import NESTED_BLOCKSIZE
from .reports import Description


def describe(path: Path, base: Path | None = None, allow_pickle: bool = False) -> Description:
    """The contract's inspect record for PATH (a model directory, an adapter, or a GGUF file)."""
    kind, where = path_kind(Path(path))
    if kind == "gguf":
        return describe_gguf(where)
    if kind == "adapter":
        return describe_adapter(where, base, allow_pickle)
    if base is not None:
        raise InputError(f"{where} is a model directory; --base applies only to an adapter.")
    return describe_model(ModelDir(where, allow_pickle))


def _quant_summary(model: ModelDir) -> dict | None:
    """Quantization as stored: type, blocksize, double quant, compute dtype, bits per parameter (from bytes)."""
    if not model.is_4bit:
        return None
    entries = list(model.quantized.values())
    qcfg = model.quantization_config or {}
    params = bits = 0
    for e in entries:
        params += e.numel
        bits += 8 * model.store.nbytes(e.name) + 8 * model.store.nbytes(e.name + ".absmax")
        if e.nested_offset is not None:
            bits += 8 * model.store.nbytes(e.name + ".nested_absmax") + 32  # nested scales + the offset
    return {
        "quant_type": Counter(e.quant_type for e in entries).most_common(1)[0][0],
        "blocksize": Counter(e.blocksize for e in entries).most_common(1)[0][0],
        "double_quant": all(e.nested_offset is not None for e in entries),
        "compute_dtype": qcfg.get("bnb_4bit_compute_dtype"),
        "bits_per_param": round(bits / params, 4) if params else None,
        "quantized_parameters": params,
        "source": "stored 4-bit tensors (code tables excluded)",
    }


def _assumed_quant(q: QuantSettings, source: Source) -> dict:
    """The quantization training applied to a 16-bit base, with bits per parameter from the layer shapes."""
    params = bits = 0
    for name in source.weights.quantized_names():
        n = prod(source.base.logical_shape(name))
        blocks = -(n // -q.blocksize)
        params += n
        bits += 8 * ((n + 1) // 2) + blocks * (8 if q.double_quant else 32)
        if q.double_quant:
            bits += 32 * -(blocks // -NESTED_BLOCKSIZE) + 32
    return {
        "quant_type": q.quant_type,
        "blocksize": q.blocksize,
        "double_quant": q.double_quant,
        "compute_dtype": None,
        "bits_per_param": round(bits / params, 4) if params else None,
        "quantized_parameters": params,
        "source": "as bitsandbytes quantizes this 16-bit base at load time",
    }


def _modules(source: Source) -> list[dict]:
    """One row per 2-D weight: shape, whether it is 4-bit in training, its LoRA rank and scaling."""
    # by the weight the base stores (a VLM checkpoint in its older layout stores model.layers.* for the
    # model.language_model.layers.* PEFT names)
    lora = {(m.stored_as or m.weight)[: -len(".weight")]: m for m in source.layout.lora.values()}
    quantized = source.weights.quantized_names()
    out = []
    for name in sorted(source.base.weight_names()):
        if name not in source.tensors:
            continue  # not in the output: a SEQ_CLS fine-tune's classifier has no language-model head
        shape = source.tensors[name].shape
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        mod = lora.get(module)
        rank, scaling = (
            (source.adapter.store.shape(mod.lora_A)[0], module_scaling(source.settings, mod.module))
            if mod
            else _parameter_lora(source, name)
        )
        row = {
            "name": module,
            "shape": list(shape),
            "quantized": name in quantized,
            "lora_rank": rank,
            "scaling": scaling,
        }
        if name in source.layout.replace:
            row["replaced_by_adapter"] = True  # modules_to_save (or a saved base layer) replaces the weight
        if name in source.layout.rows:
            row["trainable_tokens"] = len(source.layout.rows[name][1])  # rows the adapter replaces
        out.append(row)
    return out


def _parameter_lora(source: Source, name: str) -> tuple[int | None, float | None]:
    """(r, scaling) of a LoRA on a parameter (target_parameters) that stored tensor `name` takes a part of."""
    if not source.layout.params or name not in source.param_deltas:
        return None, None
    return source.param_deltas.rank_scaling(name)


def _count_params(model: ModelDir) -> int:
    return sum(prod(model.logical_shape(n)) for n in model.weight_names())


def describe_model(model: ModelDir) -> Description:
    source = Source(model, None, QuantSettings(), "dequantized" if model.is_4bit else "original")
    prov = read_provenance(model.path)
    return Description(
        kind="merged" if prov is not None else ("base-4bit" if model.is_4bit else "base"),
        path=str(model.path),
        architecture=model.architecture,
        num_parameters=_count_params(model),
        quantization=_quant_summary(model),
        adapter=None,
        modules=_modules(source),
        problems=[p.to_json() for p in problems(source)],
        extra={"dtype": model.config.get("dtype") or model.config.get("torch_dtype")}
        | ({"provenance": prov} if prov is not None else {}),
    )


def _adapter_summary(ad: Adapter) -> dict:
    s = ad.settings
    return {
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "target_modules": ad.target_modules,
        "target_parameters": sorted(ad.target_parameters),
        "modules_to_save": ad.modules_to_save,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
        "fan_in_fan_out": s.fan_in_fan_out,
        "base_model_name_or_path": ad.base_model_name_or_path,
        "trainable_tokens": {k.removesuffix(".weight"): list(v[1]) for k, v in ad.layout.rows.items()},
        "num_lora_modules": len(ad.layout.lora),
        "num_parameters": sum(prod(ad.store.shape(k)) for k in ad.store.keys()),
    }


_SCAN_BYTES = 64 * 2**20  # adapter tensors are scanned in row blocks of about this size


def _scan(ad: Adapter, key: str, test) -> bool:
    """True when test(rows) holds for some block of rows of adapter tensor `key` (memory: one block)."""
    shape = ad.store.shape(key)
    if not shape or ad.store.nbytes(key) <= _SCAN_BYTES:
        return bool(test(ad.get(key)))
    step = max(1, shape[0] * _SCAN_BYTES // ad.store.nbytes(key))
    return any(test(ad.store.get(key, (r, min(r + step, shape[0])))) for r in range(0, shape[0], step))


def _adapter_problems(ad: Adapter) -> list[Problem]:
    """NaN/Inf, zero scaling and untrained modules, read a block of rows at a time."""
    found = []
    for key in ad.store.keys():
        if ad.store.dtype(key).is_floating_point and _scan(ad, key, lambda t: not torch.isfinite(t).all()):
            found.append(Problem("error", f"adapter tensor {key} contains NaN or Inf."))
    for mod in ad.layout.lora.values():
        _r, alpha = module_rank_alpha(ad.settings, mod.module)
        if alpha == 0:
            found.append(
                Problem("warning", f"{mod.module}: scaling is zero (lora_alpha 0); its delta is dropped.")
            )
        if not _scan(ad, mod.lora_B, lambda t: t.any()):
            found.append(
                Problem(
                    "warning",
                    f"{mod.module}: lora_B is all zeros, so this module's delta is zero (untrained?).",
                )
            )
    return found


def describe_adapter(path: Path, base: Path | None, allow_pickle: bool = False) -> Description:
    ad = Adapter(path, allow_pickle)
    found = _adapter_problems(ad)
    try:
        base_dir = ModelDir(resolve_base_path(ad, base), allow_pickle)
    except InputError as e:
        if base is not None:
            raise
        found.append(Problem("warning", f"base not inspected: {e}"))
        modules = [
            {
                "name": m.module,
                "shape": _adapter_shape(ad, m),
                "quantized": None,
                "lora_rank": ad.store.shape(m.lora_A)[0],
                "scaling": module_scaling(ad.settings, m.module),
            }
            for m in sorted(ad.layout.lora.values(), key=lambda m: m.module)
        ]
        return Description(
            "adapter",
            str(ad.path),
            (ad.config.get("auto_mapping") or {}).get("base_model_class"),
            None,
            None,
            _adapter_summary(ad),
            modules,
            [p.to_json() for p in found],
        )
    q = quant_settings_for(ad, None, base_dir)
    source = Source(base_dir, ad, q)
    try:  # another model than the base the adapter names: an error here, a refusal in merge/export/check
        found += [Problem("warning", w) for w in confirm_base(ad, base_dir, base is not None)]
    except MismatchError as e:
        found.append(Problem("error", str(e)))
    return Description(
        "adapter",
        str(ad.path),
        base_dir.architecture,
        _count_params(base_dir),
        _quant_summary(base_dir) or _assumed_quant(q, source),
        _adapter_summary(ad),
        _modules(source),
        [p.to_json() for p in problems(source) + found],
        {"base": str(base_dir.path)},
    )


def _adapter_shape(ad: Adapter, m) -> list[int]:
    a, b = ad.store.shape(m.lora_A), ad.store.shape(m.lora_B)
    if m.kind == "embedding" or ad.settings.fan_in_fan_out:
        return [a[1], b[0]]
    return [b[0], a[1]]


def describe_gguf(path: Path) -> Description:
    """Architecture, tensor types and metadata of a GGUF file, via the gguf package's reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on corrupt files
        raise InputError(f"{path}: cannot read as GGUF ({e}). The file is corrupt or truncated.") from e
    keep = (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    )
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or (key.startswith("tokenizer.ggml.") and key not in keep):
            continue
        try:
            value = fld.contents()
        except Exception:  # noqa: BLE001 - unreadable field: show its type only
            value = f"<{fld.types}>"
        if isinstance(value, list) and len(value) > 16:
            value = f"<array of {len(value)}>"
        if isinstance(value, str) and len(value) > 200:
            value = value[:200] + "..."
        meta[key] = value
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return Description(
        kind="gguf",
        path=str(path),
        architecture=meta.get("general.architecture"),
        num_parameters=int(sum(int(t.n_elements) for t in reader.tensors)),
        quantization={
            "file_type": meta.get("general.file_type"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        },
        adapter=None,
        modules=[
            {"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name}
            for t in reader.tensors
        ],
        problems=[],
        extra={"metadata": meta, "vocab_size": len(tokens.data) if tokens is not None else None},
    )
