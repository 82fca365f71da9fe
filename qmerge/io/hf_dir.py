"""Hugging Face model directories: read (config, single or sharded weights, bitsandbytes 4-bit states)
and write (safetensors shards with an index, config, tokenizer and generation files).

Nothing here loads a model: tensors are read one at a time on request.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputError
from ..quant.blockwise import QuantState
from .bnb import (
    QUANT_STATE_MARK,
    QUANT_SUFFIXES,
    QuantEntry,
    expected_parts,
    packed_bytes,
    parse_state,
    quant_state,
)
from .files import read_json
from .records import PROVENANCE
from .safetensors import PlannedTensor, StreamingSafetensorsWriter
from .store import TensorStore, open_store

# Tokenizer files an adapter may carry (they win over the base's).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
# Files a model directory carries beside its weights, copied into outputs.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    # what a vision-language model serves with (transformers' processors)
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


class ModelDir:
    """A local Hugging Face model directory (16-bit, bitsandbytes 4-bit, or a qmerge output)."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory. Pass a Hugging Face model directory.")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise InputError(
                f"{self.path}: no config.json, so this is not a Hugging Face model directory. "
                "Pass the directory that holds config.json and the weights."
            )
        self.config = read_json(cfg)
        self.store: TensorStore = open_store(self.path, "model", allow_pickle)
        self.quantized: dict[str, QuantEntry] = self._find_quantized()

    @property
    def quantization_config(self) -> dict | None:
        q = self.config.get("quantization_config")
        return q if isinstance(q, dict) else None

    @property
    def is_4bit(self) -> bool:
        return bool(self.quantized)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return (
            str(archs[0])
            if isinstance(archs, list) and archs
            else str(self.config.get("model_type", "unknown"))
        )

    def _find_quantized(self) -> dict[str, QuantEntry]:
        found: dict[str, QuantEntry] = {}
        for key in self.store.keys():
            if QUANT_STATE_MARK not in key:
                continue
            raw = self.store.get(key)
            if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > 1 << 16:
                raise InputError(
                    f"{self.path}: quant state {key!r} is not a short uint8 vector. Re-save the 4-bit base."
                )
            entry = parse_state(key, bytes(raw.tolist()), str(self.path))
            self._check_parts(entry)
            found[entry.name] = entry
        return found

    def _check_parts(self, e: QuantEntry) -> None:
        """The packed codes and scales beside a 4-bit weight exist and have the sizes its state implies."""
        if e.name not in self.store:
            raise InputError(f"{self.path}: 4-bit weight {e.name!r} has a quant state but no packed tensor.")
        have, need = self.store.nbytes(e.name), packed_bytes(e)
        itemsize = torch.empty(0, dtype=self.store.dtype(e.name)).element_size()
        if not need <= have < need + itemsize:
            raise InputError(
                f"{self.path}: 4-bit weight {e.name!r} holds {have} bytes of packed codes, its shape "
                f"{list(e.shape)} needs {need}. The checkpoint is truncated or its quant state is wrong."
            )
        for key, (count, allowed) in expected_parts(e).items():
            if key not in self.store:
                what = "is double-quantized but lacks" if "nested" in key else "lacks"
                raise InputError(f"{self.path}: 4-bit weight {e.name!r} {what} tensor {key!r}.")
            shape, dt = self.store.shape(key), self.store.dtype(key)
            n = int(torch.Size(shape).numel())
            if n != count or dt not in allowed:
                raise InputError(
                    f"{self.path}: {key!r} is {str(dt).replace('torch.', '')} with {n} values; the quant state "
                    f"of {e.name!r} (shape {list(e.shape)}, blocksize {e.blocksize}) needs {count}. "
                    "The checkpoint is corrupt."
                )

    def is_companion(self, key: str) -> bool:
        """True for a quant-state tensor that belongs to a 4-bit weight (not a weight of its own)."""
        if QUANT_STATE_MARK in key:
            return True
        return any(key.endswith(s) and key[: -len(s)] in self.quantized for s in QUANT_SUFFIXES)

    def stored_as(self) -> dict[str, str]:
        """{model parameter name: the name this checkpoint stores it by} (hf_meta.stored_as), once."""
        if getattr(self, "_stored_as", None) is None:
            from .hf_names import stored_as

            self._stored_as = stored_as(self.config, self.weight_names())
        return self._stored_as

    def conv1d_weights(self) -> frozenset[str]:
        """The stored names of transformers Conv1D weights ([in, out] on disk; bitsandbytes quantizes them
        transposed), also where the checkpoint stores them by other names (GPT-2's release: h.0.*)."""
        from .hf_meta import conv1d_weights

        model = conv1d_weights(self.config)
        if not model:
            return model
        saved = self.stored_as()
        return model | {saved.get(n, n) for n in model}

    def weight_names(self) -> list[str]:
        """The model's logical tensors: every stored tensor except quant-state companions."""
        return [k for k in self.store.keys() if not self.is_companion(k)]

    def stored_parts(self, name: str) -> list[str]:
        """The stored tensors that make up weight `name`: itself, and its quant state if it is 4-bit."""
        if name not in self.quantized:
            return [name]
        return [name, *(name + s for s in QUANT_SUFFIXES)]

    def logical_shape(self, name: str) -> tuple[int, ...]:
        return self.quantized[name].shape if name in self.quantized else self.store.shape(name)

    def quant_state(self, name: str) -> tuple[torch.Tensor, QuantState]:
        """The packed codes and QuantState of 4-bit weight `name`, as saved by transformers."""
        return quant_state(self.quantized[name], self.store.get)

    def side_files(self) -> Iterator[Path]:
        """Tokenizer, generation config and chat template files to carry into an output directory."""
        for n in SIDE_FILES:
            p = self.path / n
            if p.is_file():
                yield p


def output_config(config: dict, dtype: torch.dtype, vocab_size: int | None = None) -> dict:
    """`config` for a plain (non-quantized) model in `dtype`."""
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg["dtype"] = dtypes.config_name(dtype)
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtypes.config_name(dtype)
    if vocab_size is not None and "vocab_size" in cfg:
        cfg["vocab_size"] = vocab_size
    return cfg


def copy_side_files(out_dir: Path, base: ModelDir, adapter_dir: Path | None) -> None:
    """Tokenizer and generation config from the base (the adapter's own tokenizer files win)."""
    for p in base.side_files():
        shutil.copy2(p, out_dir / p.name)
    if adapter_dir is not None:
        for name in TOKENIZER_FILES:
            p = adapter_dir / name
            if p.is_file():
                shutil.copy2(p, out_dir / name)


_SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_WRITTEN = {"config.json", "model.safetensors.index.json", PROVENANCE, "README.md", *SIDE_FILES}


def not_written_by_qmerge(path: Path) -> str | None:
    """Why `path` is not a model directory qmerge wrote (None when it is one: --force may replace it)."""
    if not path.is_dir():
        return "it is not a directory"
    if not (path / PROVENANCE).is_file():
        return f"it has no {PROVENANCE}"
    for p in sorted(path.iterdir()):
        if p.is_symlink() or not p.is_file() or not (p.name in _WRITTEN or _SHARD.match(p.name)):
            return f"it holds {p.name}, which qmerge does not write (move it first)"
    return None


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1GiB' or a byte count -> a positive number of bytes (--max-shard-size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; use e.g. 2GB, 500MB or a number of bytes")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update(KIB=2**10, MIB=2**20, GIB=2**30, TIB=2**40)
    size = int(float(m[1]) * scale[(m[2] or "B").upper()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be more than 0 bytes")
    return size


def split_shards(entries: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Consecutive runs of entries of at most max_shard_size bytes (a larger tensor gets a shard alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class ShardedSafetensors:
    """Tensors arriving in `entries` order, written into safetensors shards (with an index when several).

    One shard is open at a time; `digests` maps each finished shard's file name to its sha256.
    """

    def __init__(self, out_dir: Path, entries: list[PlannedTensor], max_shard_size: int):
        self.out_dir = Path(out_dir)
        self.entries = entries
        self.shards = split_shards(entries, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.digests: dict[str, str] = {}
        self._index = -1
        self._left = 0
        self._writer: StreamingSafetensorsWriter | None = None

    def _open_next(self) -> StreamingSafetensorsWriter:
        self._index += 1
        shard = self.shards[self._index]
        self._writer = StreamingSafetensorsWriter(
            self.out_dir / self.names[self._index], shard, {"format": "pt"}
        )
        self._left = len(shard)
        return self._writer

    def wait_for_room(self, nbytes: int) -> None:
        (self._writer if self._left else self._open_next()).wait_for_room(nbytes)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        writer = self._writer if self._left else self._open_next()
        writer.write(key, tensor)
        self._left -= 1
        if not self._left:
            writer.close()
            self.digests[self.names[self._index]] = writer.sha256

    def close(self) -> dict[str, str]:
        if self._left or self._index + 1 != len(self.shards):
            raise RuntimeError(
                f"{self.out_dir}: closed with tensors of shard {self._index + 1} still to write"
            )
        if len(self.shards) > 1:
            weight_map = {e.name: n for n, shard in zip(self.names, self.shards, strict=True) for e in shard}
            index = {
                "metadata": {"total_size": sum(e.nbytes for e in self.entries)},
                "weight_map": weight_map,
            }
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        return self.digests

    def abort(self) -> None:
        if self._writer is not None and self._left:
            self._writer.abort()
