"""Hugging Face model directories: config, (sharded) weights, and bitsandbytes 4-bit quant states.

Nothing here loads a model: tensors are read one at a time on request.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..quant.blockwise import QuantState
from .safetensors_io import SafetensorsFile

QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_STATE_MARK = ".quant_state.bitsandbytes__"
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a clear InputError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found.") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}). Fix or regenerate the file.") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object.")
    return data


def torch_dtype_of(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None:
        return default
    name = str(name).replace("torch.", "")
    if name not in _TORCH_DTYPES:
        raise InputError(f"unsupported dtype {name!r}: expected one of {sorted(_TORCH_DTYPES)}.")
    return _TORCH_DTYPES[name]


class TensorStore:
    """The weights of one directory: single or sharded safetensors, or (opt-in) pickled .bin/.pt files."""

    def __init__(self, directory: Path, stem: str = "model", allow_pickle: bool = False):
        self.directory = Path(directory)
        self._where: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.files: list[Path] = []
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future] = {}  # prefetched reads not yet taken
        self._groups: deque[list[str]] = deque()  # names of the last two prefetch calls
        index = self.directory / f"{stem}.safetensors.index.json"
        single = self.directory / f"{stem}.safetensors"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{index}: no 'weight_map'. Re-save the model.")
            shards: dict[str, SafetensorsFile] = {}
            for shard in sorted(set(weight_map.values())):
                p = self.directory / shard
                if not p.exists():
                    raise InputError(f"{index}: names shard {shard}, which is missing from {self.directory}.")
                shards[shard] = SafetensorsFile(p)
            for name, shard in weight_map.items():
                if name not in shards[shard].tensors:
                    raise InputError(f"{index}: says {name!r} is in {shard}, but it is not there.")
                self._where[name] = shards[shard]
            self.files = [self.directory / s for s in sorted(shards)]
        elif single.exists():
            f = SafetensorsFile(single)
            self._where = dict.fromkeys(f.tensors, f)
            self.files = [single]
        else:
            pickled = sorted(self.directory.glob(f"{stem}*.bin")) + sorted(self.directory.glob(f"{stem}*.pt"))
            if pickled and not allow_pickle:
                raise InputError(
                    f"{self.directory}: weights are only in pickle files ({pickled[0].name}); qmerge never "
                    "unpickles without --allow-pickle (then with torch.load(weights_only=True))."
                )
            if not pickled:
                raise InputError(f"{self.directory}: no {stem}.safetensors (or sharded index) found.")
            self._pickled = {}
            for p in pickled:
                try:
                    part = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises many types for a bad pickle
                    raise InputError(f"{p}: cannot load with weights_only=True ({e}).") from e
                self._pickled.update(part)
            self.files = pickled

    def keys(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in (self._pickled if self._pickled is not None else self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return self._where[name].tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        if self._pickled is not None:
            return self._pickled[name].dtype
        return self._where[name].tensors[name].torch_dtype

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if self._pickled is not None:
            t = self._pickled[name]
            return (t if rows is None else t[rows[0] : rows[1]]).clone()
        ahead = self._ahead.pop(name, None) if rows is None else None
        if ahead is not None:
            return ahead.result()
        return self._where[name].read(name, rows)

    def prefetch(self, names: list[str]) -> None:
        """Start reading `names` on a background thread; the next get(name) of each takes the result.

        What the call before last prefetched and nobody took is forgotten, so a streaming caller that
        asks for tensor k + 1's parts before computing tensor k reads them from the disk meanwhile, for
        the memory of one more tensor.
        """
        if self._pickled is not None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="qmerge-read")
        if len(self._groups) == 2:
            for name in self._groups.popleft():
                self._ahead.pop(name, None)
        group = [n for n in names if n in self._where and n not in self._ahead]
        for name in group:
            self._ahead[name] = self._reader.submit(self._where[name].read, name)
        self._groups.append(group)

    def nbytes(self, name: str) -> int:
        if self._pickled is not None:
            t = self._pickled[name]
            return t.numel() * t.element_size()
        return self._where[name].tensors[name].nbytes


@dataclass(frozen=True)
class QuantEntry:
    """A bitsandbytes 4-bit weight in a checkpoint: the packed tensor's name and its parsed state JSON."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    quant_type: str
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_offset: float | None
    nested_blocksize: int
    nested_dtype: torch.dtype = torch.float32


class ModelDir:
    """A local Hugging Face model directory (16-bit, bitsandbytes 4-bit, or a qmerge merge output)."""

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
        self.store = TensorStore(self.path, "model", allow_pickle)
        self.quantized = self._find_quantized()

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def is_4bit(self) -> bool:
        return bool(self.quantized)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else str(self.config.get("model_type", "unknown"))

    def _find_quantized(self) -> dict[str, QuantEntry]:
        found: dict[str, QuantEntry] = {}
        for key in self.store.keys():
            if QUANT_STATE_MARK not in key:
                continue
            name = key.split(QUANT_STATE_MARK)[0]
            raw = self.store.get(key)
            try:
                state = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
                entry = QuantEntry(
                    name=name,
                    quant_type=state["quant_type"],
                    blocksize=int(state["blocksize"]),
                    dtype=torch_dtype_of(state.get("dtype"), torch.float32),
                    shape=tuple(int(d) for d in state["shape"]),
                    nested_offset=state.get("nested_offset"),
                    nested_blocksize=int(state.get("nested_blocksize", 256)),
                    nested_dtype=torch_dtype_of(state.get("nested_dtype"), torch.float32),
                )
            except (KeyError, ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{self.path}: corrupt bitsandbytes quant state {key!r} ({e}).") from e
            for part in (name, name + ".absmax", name + ".quant_map"):
                if part not in self.store:
                    raise InputError(f"{self.path}: 4-bit weight {name!r} lacks tensor {part!r}.")
            if entry.nested_offset is not None and name + ".nested_absmax" not in self.store:
                raise InputError(
                    f"{self.path}: 4-bit weight {name!r} is double-quantized but lacks nested_absmax."
                )
            found[name] = entry
        return found

    def is_companion(self, key: str) -> bool:
        """True for a quant-state tensor that belongs to a 4-bit weight (not a weight of its own)."""
        if QUANT_STATE_MARK in key:
            return True
        return any(key.endswith(s) and key[: -len(s)] in self.quantized for s in QUANT_SUFFIXES)

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
        e = self.quantized[name]
        nested = e.nested_offset is not None
        state = QuantState(
            absmax=self.store.get(name + ".absmax"),
            shape=e.shape,
            dtype=e.dtype,
            blocksize=e.blocksize,
            quant_type=e.quant_type,
            code=self.store.get(name + ".quant_map").float(),
            offset=torch.tensor(float(e.nested_offset), dtype=torch.float32) if nested else None,
            nested_absmax=self.store.get(name + ".nested_absmax").float() if nested else None,
            nested_code=self.store.get(name + ".nested_quant_map").float() if nested else None,
            nested_blocksize=e.nested_blocksize,
            nested_dtype=e.nested_dtype,
        )
        return self.store.get(name), state

    def iter_side_files(self) -> Iterator[Path]:
        """Tokenizer, generation config and chat template files to carry into an output directory."""
        names = (
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
        )
        for n in names:
            p = self.path / n
            if p.is_file():
                yield p
