"""PEFT LoRA adapter directories (and trainer checkpoint-N/ folders that hold one)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, UnsupportedError
from ..lora.scaling import LoraSettings
from .checkpoint import TensorStore, read_json

PEFT_PREFIX = "base_model.model."
# LoraConfig options that change what a merge must do and that qmerge does not implement.
_UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
}


@dataclass
class LoraModule:
    """The adapter tensors that touch one base module (fp32 copies made on demand)."""

    module: str  # base module name, e.g. "model.layers.0.self_attn.q_proj"
    kind: str = "linear"  # "linear" or "embedding"
    lora_A: str | None = None  # adapter tensor keys
    lora_B: str | None = None
    lora_B_bias: str | None = None
    magnitude: str | None = None  # DoRA


@dataclass
class AdapterLayout:
    """What each adapter tensor is for."""

    lora: dict[str, LoraModule] = field(default_factory=dict)
    replace: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key


def resolve_adapter_dir(path: Path) -> Path:
    """The directory holding adapter_config.json: `path` itself, or a clear error saying what to pass."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory.")
    if path.is_file():
        if path.name in ("adapter_config.json", "adapter_model.safetensors"):
            return path.parent
        raise InputError(f"{path}: expected a PEFT adapter directory (with adapter_config.json).")
    if (path / "adapter_config.json").exists():
        return path
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / "adapter_config.json").exists()),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    if checkpoints:
        raise InputError(
            f"{path}: holds trainer checkpoints but no adapter of its own. Pass one of them, "
            f"e.g. {checkpoints[-1]}."
        )
    if (path / "config.json").exists():
        raise InputError(
            f"{path}: is a model directory, not an adapter (no adapter_config.json). Pass the adapter "
            "directory as ADAPTER and this one with --base."
        )
    raise InputError(f"{path}: no adapter_config.json, so this is not a PEFT adapter directory.")


class Adapter:
    """A PEFT LoRA adapter: its config, settings, and lazily read tensors."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = resolve_adapter_dir(path)
        self.config = read_json(self.path / "adapter_config.json")
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedError(
                f"{self.path}: adapter type {peft_type} is not supported; qmerge merges LoRA adapters "
                "(including rsLoRA and DoRA)."
            )
        for key, what in _UNSUPPORTED_OPTIONS.items():
            if self.config.get(key):
                raise UnsupportedError(f"{self.path}/adapter_config.json: {key} ({what}) is not supported.")
        init = self.config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
            raise UnsupportedError(
                f"{self.path}: init_lora_weights={init!r} changes the base weights during training; merging "
                "such an adapter needs the converted base, which qmerge does not support."
            )
        try:
            self.settings = LoraSettings(
                r=int(self.config.get("r", 8)),
                lora_alpha=float(self.config.get("lora_alpha", 8)),
                use_rslora=bool(self.config.get("use_rslora", False)),
                use_dora=bool(self.config.get("use_dora", False)),
                rank_pattern=dict(self.config.get("rank_pattern") or {}),
                alpha_pattern=dict(self.config.get("alpha_pattern") or {}),
                fan_in_fan_out=bool(self.config.get("fan_in_fan_out", False)),
            )
        except (TypeError, ValueError) as e:
            raise InputError(f"{self.path}/adapter_config.json: bad r/lora_alpha/pattern value ({e}).") from e
        self.store = TensorStore(self.path, "adapter_model", allow_pickle)
        self.layout = layout_adapter(self.store.keys(), self.path)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def target_modules(self) -> list[str] | str | None:
        t = self.config.get("target_modules")
        return sorted(t) if isinstance(t, list) else t

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    def get(self, key: str) -> torch.Tensor:
        return self.store.get(key)


_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)


def layout_adapter(keys: list[str], where: Path) -> AdapterLayout:
    """Sort adapter tensor keys into LoRA modules and whole-tensor replacements; reject anything else."""
    layout = AdapterLayout()
    for key in keys:
        if not key.startswith(PEFT_PREFIX):
            raise InputError(
                f"{where}: adapter tensor {key!r} does not start with {PEFT_PREFIX!r}; this is not a PEFT "
                "LoRA checkpoint for a causal language model."
            )
        rest = key[len(PEFT_PREFIX) :]
        # Adapter names other than the default are stripped by PEFT on save; a leftover one is an error.
        m = _LORA_KEY.match(rest)
        if m:
            mod = layout.lora.setdefault(m["module"], LoraModule(m["module"]))
            part = m["part"]
            if part == "lora_A.weight":
                mod.lora_A = key
            elif part == "lora_B.weight":
                mod.lora_B = key
            elif part == "lora_B.bias":
                mod.lora_B_bias = key
            elif part == "lora_embedding_A":
                mod.kind, mod.lora_A = "embedding", key
            elif part == "lora_embedding_B":
                mod.kind, mod.lora_B = "embedding", key
            else:
                mod.magnitude = key
            continue
        if ".lora_" in rest:
            raise UnsupportedError(f"{where}: adapter tensor {key!r} is a LoRA part qmerge does not know.")
        # modules_to_save, bias="all"/"lora_only", and saved embedding base layers replace base tensors.
        layout.replace[rest.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = key
    for mod in layout.lora.values():
        if mod.lora_A is None or mod.lora_B is None:
            raise InputError(
                f"{where}: module {mod.module!r} has only one of lora_A/lora_B; the adapter is incomplete."
            )
    return layout
