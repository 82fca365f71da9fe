"""Tensor stores: the weights of one directory (single or sharded safetensors, or opt-in pickle files),
read one tensor at a time on request. Two implementations behind one interface; `open_store` picks."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from ..errors import InputError
from .files import read_json
from .safetensors import SafetensorsFile


class TensorStore(Protocol):
    """What readers above io need of a directory's weights."""

    directory: Path
    files: list[Path]

    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def nbytes(self, name: str) -> int: ...
    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...
    def prefetch(self, names: list[str]) -> None: ...


def open_store(directory: Path, stem: str = "model", allow_pickle: bool = False) -> TensorStore:
    """The weights of `directory`: {stem}.safetensors, a sharded index, or (with allow_pickle) *.bin/*.pt."""
    directory = Path(directory)
    index = directory / f"{stem}.safetensors.index.json"
    single = directory / f"{stem}.safetensors"
    if index.exists():
        return SafetensorsStore.sharded(directory, index)
    if single.exists():
        return SafetensorsStore(directory, {single.name: SafetensorsFile(single)})
    pickled = sorted(directory.glob(f"{stem}*.bin")) + sorted(directory.glob(f"{stem}*.pt"))
    if pickled and not allow_pickle:
        raise InputError(
            f"{directory}: weights are only in pickle files ({pickled[0].name}); qmerge never "
            "unpickles without --allow-pickle (then with torch.load(weights_only=True))."
        )
    if not pickled:
        raise InputError(f"{directory}: no {stem}.safetensors (or sharded index) found.")
    return PickleStore(directory, pickled)


class SafetensorsStore:
    """Safetensors files read with positioned reads; `prefetch` reads ahead on a background thread."""

    def __init__(
        self, directory: Path, files: dict[str, SafetensorsFile], where: dict[str, str] | None = None
    ):
        self.directory = directory
        self._files = files
        self.files = [directory / n for n in sorted(files)]
        if where is None:
            (only,) = files
            where = dict.fromkeys(files[only].tensors, only)
        self._where = {name: files[shard] for name, shard in where.items()}
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: dict[str, Future] = {}  # prefetched reads not yet taken
        self._groups: deque[list[str]] = deque()  # names of the last two prefetch calls

    @classmethod
    def sharded(cls, directory: Path, index: Path) -> SafetensorsStore:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: no 'weight_map' of tensor names to shard files. Re-save the model.")
        shards: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            p = directory / shard
            if Path(shard).name != shard or not p.exists():
                raise InputError(f"{index}: names shard {shard!r}, which is not a file in {directory}.")
            shards[shard] = SafetensorsFile(p)
        stem = index.name.removesuffix(".safetensors.index.json")
        unnamed = sorted(p.name for p in directory.glob(f"{stem}-*.safetensors") if p.name not in shards)
        if unnamed:
            raise InputError(
                f"{index}: the weight_map names no tensor of {unnamed[0]}, which is a shard of this model: the "
                "index omits its tensors. Re-save the model (or regenerate the index)."
            )
        for name, shard in weight_map.items():
            if name not in shards[shard].tensors:
                raise InputError(f"{index}: says {name!r} is in {shard}, but it is not there.")
        for shard, f in shards.items():
            stray = [n for n in f.tensors if weight_map.get(n) != shard]
            if stray:
                raise InputError(
                    f"{index}: {shard} holds {stray[0]!r}, which the weight_map places elsewhere or omits: the "
                    "index is wrong. Re-save the model (or regenerate the index)."
                )
        return cls(directory, shards, weight_map)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str):
        return self._where[name].tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).torch_dtype

    def nbytes(self, name: str) -> int:
        return self.info(name).nbytes

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
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
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="qmerge-read")
        if len(self._groups) == 2:
            for name in self._groups.popleft():
                self._ahead.pop(name, None)
        group = [n for n in names if n in self._where and n not in self._ahead]
        for name in group:
            self._ahead[name] = self._reader.submit(self._where[name].read, name)
        self._groups.append(group)


class PickleStore:
    """Pickled state dicts (*.bin, *.pt), loaded with torch.load(weights_only=True, mmap=True)."""

    def __init__(self, directory: Path, files: list[Path]):
        self.directory = directory
        self.files = files
        self._tensors: dict[str, torch.Tensor] = {}
        for p in files:
            try:
                part = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise InputError(f"{p}: cannot load with weights_only=True ({e}).") from e
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                raise InputError(f"{p}: not a state dict of tensors.")
            self._tensors.update(part)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def nbytes(self, name: str) -> int:
        t = self._tensors[name]
        return t.numel() * t.element_size()

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[name]
        return (t if rows is None else t[rows[0] : rows[1]]).clone()

    def prefetch(self, names: list[str]) -> None:
        """Nothing to read ahead: the tensors are memory-mapped."""
