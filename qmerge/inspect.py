"""Describe a base, an adapter, a merged model or a GGUF file without loading a model."""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

import torch

from .errors import InputError
from .io.adapter import Adapter
from .io.checkpoint import ModelDir, read_json
from .lora.scaling import module_rank_alpha, module_scaling
from .plan import Problem, QLoRACheckpoint, QuantSettings, quant_settings_for, resolve_base_path
from .quant.codebooks import NESTED_BLOCKSIZE


def inspect_path(path: Path, base: Path | None = None, allow_pickle: bool = False) -> dict:
    """The contract's inspect object for PATH (a model directory, an adapter, or a GGUF file)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory.")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return inspect_gguf(path)
        if path.name in ("adapter_config.json", "adapter_model.safetensors") or path.name == "config.json":
            path = path.parent
        else:
            raise InputError(f"{path}: not a GGUF file, adapter or model directory qmerge can describe.")
    if (path / "adapter_config.json").exists() or not (path / "config.json").exists():
        return inspect_adapter(path, base, allow_pickle)
    if base is not None:
        raise InputError(f"{path} is a model directory; --base applies only to an adapter.")
    return inspect_model(ModelDir(path, allow_pickle))


def _quant_summary(model: ModelDir) -> dict | None:
    """Quantization as stored: type, blocksize, double quant, compute dtype, bits per parameter (from bytes)."""
    if not model.is_4bit:
        return None
    entries = list(model.quantized.values())
    qcfg = model.quantization_config or {}
    params = bits = 0
    for e in entries:
        n = prod(e.shape)
        params += n
        bits += 8 * model.store.nbytes(e.name) + 8 * model.store.nbytes(e.name + ".absmax")
        if e.nested_offset is not None:
            bits += 8 * model.store.nbytes(e.name + ".nested_absmax") + 32  # nested scales + the offset
    types = Counter(e.quant_type for e in entries)
    blocks = Counter(e.blocksize for e in entries)
    return {
        "quant_type": types.most_common(1)[0][0],
        "blocksize": blocks.most_common(1)[0][0],
        "double_quant": all(e.nested_offset is not None for e in entries),
        "compute_dtype": qcfg.get("bnb_4bit_compute_dtype"),
        "bits_per_param": round(bits / params, 4) if params else None,
        "quantized_parameters": params,
        "source": "stored 4-bit tensors (code tables excluded)",
    }


def _assumed_quant(q: QuantSettings, ckpt: QLoRACheckpoint) -> dict:
    """The quantization training applied to a 16-bit base, with bits per parameter from the layer shapes."""
    params = bits = 0
    for name in ckpt.quantized_names():
        n = prod(ckpt.base.logical_shape(name))
        blocks = -(n // -q.blocksize)
        params += n
        bits += 8 * ((n + 1) // 2)
        bits += blocks * (8 if q.double_quant else 32)
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


def _model_problems(model: ModelDir) -> list[Problem]:
    found = []
    qcfg = model.quantization_config or {}
    entries = list(model.quantized.values())
    if model.is_4bit and qcfg.get("bnb_4bit_use_double_quant"):
        plain = [e.name for e in entries if e.nested_offset is None]
        if plain:
            found.append(
                Problem(
                    "warning",
                    f"{len(plain)} 4-bit layers (e.g. {plain[0]}) are not double-quantized although "
                    "quantization_config asks for it: this checkpoint was probably saved after a forward pass on "
                    "CPU, which repacks bitsandbytes weights. Re-save the base from its 16-bit original.",
                )
            )
    repacked = [e for e in entries if e.nested_offset is not None and e.nested_dtype != torch.float32]
    if repacked:
        dtype = str(repacked[0].nested_dtype).replace("torch.", "")
        found.append(
            Problem(
                "warning",
                f"{len(repacked)} 4-bit layers (e.g. {repacked[0].name}) carry nested_dtype {dtype}: this checkpoint "
                "was saved after a forward pass on CPU, which repacks bitsandbytes weights (absmax rounded to bf16). "
                "Its 4-bit weights differ slightly from the ones training saw; re-save the base from its 16-bit "
                "original.",
            )
        )
    odd = [
        e.name for e in entries if model.store.dtype(e.name + ".absmax") not in (torch.uint8, torch.float32)
    ]
    if odd:
        found.append(
            Problem("warning", f"{len(odd)} 4-bit layers (e.g. {odd[0]}) store absmax in a repacked dtype.")
        )
    if qcfg and not model.is_4bit:
        found.append(
            Problem("warning", "config.json has a quantization_config but no 4-bit tensors were found.")
        )
    return found


def _modules(ckpt: QLoRACheckpoint) -> list[dict]:
    ad = ckpt.adapter
    lora = {m.module: m for m in ad.layout.lora.values()} if ad else {}
    quantized = ckpt.quantized_names()
    out = []
    for name in sorted(ckpt.base.weight_names()):
        shape = ckpt.plan_shape(name)
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        mod = lora.get(module)
        rank = scaling = None
        if mod is not None:
            rank = ad.store.shape(mod.lora_A)[0]
            scaling = module_scaling(ad.settings, module)
        row = {
            "name": module,
            "shape": list(shape),
            "quantized": name in quantized,
            "lora_rank": rank,
            "scaling": scaling,
        }
        if ad is not None and name in ad.layout.replace:
            row["replaced_by_adapter"] = True  # modules_to_save (or a saved base layer) replaces the weight
        out.append(row)
    return out


def _count_params(model: ModelDir) -> int:
    return sum(prod(model.logical_shape(n)) for n in model.weight_names())


def inspect_model(model: ModelDir) -> dict:
    ckpt = QLoRACheckpoint(None, model, QuantSettings(), "dequantized" if model.is_4bit else "original")
    prov = model.path / "qmerge_provenance.json"
    kind = "merged" if prov.exists() else ("base-4bit" if model.is_4bit else "base")
    info = {
        "kind": kind,
        "path": str(model.path),
        "architecture": model.architecture,
        "num_parameters": _count_params(model),
        "dtype": model.config.get("dtype") or model.config.get("torch_dtype"),
        "quantization": _quant_summary(model),
        "adapter": None,
        "modules": _modules(ckpt),
        "problems": [p.__dict__ for p in _model_problems(model)],
    }
    if prov.exists():
        info["provenance"] = read_json(prov)
    return info


def _adapter_summary(ad: Adapter) -> dict:
    s = ad.settings
    return {
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "target_modules": ad.target_modules,
        "modules_to_save": ad.modules_to_save,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
        "fan_in_fan_out": s.fan_in_fan_out,
        "base_model_name_or_path": ad.base_model_name_or_path,
        "num_lora_modules": len(ad.layout.lora),
        "num_parameters": sum(prod(ad.store.shape(k)) for k in ad.store.keys()),
    }


def _adapter_problems(ad: Adapter) -> list[Problem]:
    found = []
    for key in ad.store.keys():
        t = ad.get(key)
        if t.is_floating_point() and not torch.isfinite(t).all():
            found.append(Problem("error", f"adapter tensor {key} contains NaN or Inf."))
    for mod in ad.layout.lora.values():
        r, alpha = module_rank_alpha(ad.settings, mod.module)
        if alpha == 0:
            found.append(
                Problem("warning", f"{mod.module}: scaling is zero (lora_alpha 0); its delta is dropped.")
            )
        b = ad.get(mod.lora_B)
        if not b.any():
            found.append(
                Problem(
                    "warning",
                    f"{mod.module}: lora_B is all zeros, so this module's delta is zero (untrained?).",
                )
            )
    return found


def inspect_adapter(path: Path, base: Path | None, allow_pickle: bool = False) -> dict:
    ad = Adapter(path, allow_pickle)
    problems = _adapter_problems(ad)
    base_dir = None
    try:
        base_dir = ModelDir(resolve_base_path(ad, base), allow_pickle)
    except InputError as e:
        if base is not None:
            raise
        problems.append(Problem("warning", f"base not inspected: {e}"))
    info = {
        "kind": "adapter",
        "path": str(ad.path),
        "architecture": (ad.config.get("auto_mapping") or {}).get("base_model_class"),
        "num_parameters": None,
        "quantization": None,
        "adapter": _adapter_summary(ad),
        "modules": [],
        "problems": [],
    }
    if base_dir is not None:
        q = quant_settings_for(base_dir, ad, None)
        ckpt = QLoRACheckpoint(ad, base_dir, q)
        problems = ckpt.problems() + problems + _model_problems(base_dir)
        info.update(
            base=str(base_dir.path),
            architecture=base_dir.architecture,
            num_parameters=_count_params(base_dir),
            quantization=_quant_summary(base_dir) or _assumed_quant(q, ckpt),
            modules=_modules(ckpt),
        )
    else:
        info["modules"] = [
            {
                "name": m.module,
                "shape": _adapter_shape(ad, m),
                "quantized": None,
                "lora_rank": ad.store.shape(m.lora_A)[0],
                "scaling": module_scaling(ad.settings, m.module),
            }
            for m in sorted(ad.layout.lora.values(), key=lambda m: m.module)
        ]
    info["problems"] = [p.__dict__ for p in problems]
    return info


def _adapter_shape(ad: Adapter, m) -> list[int]:
    a, b = ad.store.shape(m.lora_A), ad.store.shape(m.lora_B)
    if m.kind == "embedding":
        return [a[1], b[0]]
    return [a[1], b[0]] if ad.settings.fan_in_fan_out else [b[0], a[1]]


def inspect_gguf(path: Path) -> dict:
    """Architecture, tensor types and metadata of a GGUF file, via the gguf package's reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on corrupt files
        raise InputError(f"{path}: cannot read as GGUF ({e}). The file is corrupt or truncated.") from e
    meta = {}
    for key, field in reader.fields.items():
        if (
            key.startswith("GGUF.")
            or key.startswith("tokenizer.ggml.")
            and key
            not in (
                "tokenizer.ggml.model",
                "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
            )
        ):
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001 - unreadable field: show its type only
            value = f"<{field.types}>"
        if isinstance(value, list) and len(value) > 16:
            value = f"<array of {len(value)}>"
        if isinstance(value, str) and len(value) > 200:
            value = value[:200] + "..."
        meta[key] = value
    types = Counter(t.tensor_type.name for t in reader.tensors)
    arch = meta.get("general.architecture")
    n_vocab = (
        len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    )
    return {
        "kind": "gguf",
        "path": str(path),
        "architecture": arch,
        "num_parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "quantization": {"file_type": meta.get("general.file_type"), "tensor_types": dict(types)},
        "adapter": None,
        "modules": [
            {"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name}
            for t in reader.tensors
        ],
        "metadata": meta,
        "vocab_size": n_vocab,
        "problems": [],
    }
