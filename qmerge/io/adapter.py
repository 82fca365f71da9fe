"""PEFT LoRA adapter directories (and trainer checkpoint-N/ folders that hold one)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, UnsupportedError
from ..lora.scaling import LoraSettings
from .files import read_json
from .store import TensorStore, open_store

PEFT_PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
# LoraConfig options that change what a merge must do and that qmerge does not implement.
_UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """The adapter tensors that touch one base module."""

    module: str  # base module name, e.g. "model.layers.0.self_attn.q_proj"
    kind: str = "linear"  # "linear" or "embedding"
    lora_A: str | None = None  # adapter tensor keys
    lora_B: str | None = None
    lora_B_bias: str | None = None
    magnitude: str | None = None  # DoRA
    stored_as: str | None = None  # the weight's checkpoint name, where transformers renames it at load time
    # LoRA on a parameter (target_parameters): ParamWrappers nest, each `depth` ".base_layer"s below the outermost
    depth: int = 0
    target: tuple[str, int, bool] | None = None  # (model parameter, experts, swapped in/out), once resolved

    @property
    def weight(self) -> str:
        return self.stored_as or self.module + ".weight"

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.lora_A, self.lora_B, self.lora_B_bias, self.magnitude) if k]


@dataclass(frozen=True)
class AdapterLayout:
    """What each adapter tensor is for (empty for a model directory merged already)."""

    lora: dict[str, LoraModule] = field(default_factory=dict)  # module name -> its tensors
    replace: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    # trainable tokens: weight name -> (adapter key of the new rows, the token ids they replace)
    rows: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # LoRA on parameters (target_parameters): model parameter name -> its LoRA (pipeline resolves them)
    params: dict[str, LoraModule] = field(default_factory=dict)


def resolve_adapter_dir(path: Path) -> Path:
    """The directory holding adapter_config.json: `path` itself, or a clear error saying what to pass."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory.")
    if path.is_file():
        if path.name in (CONFIG, "adapter_model.safetensors"):
            return path.parent
        raise InputError(f"{path}: expected a PEFT adapter directory (with {CONFIG}).")
    if (path / CONFIG).exists():
        return path
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if (p / CONFIG).exists()),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    if checkpoints:
        raise InputError(
            f"{path}: holds trainer checkpoints but no adapter of its own. Pass one of them, "
            f"e.g. {checkpoints[-1]}."
        )
    named = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).exists())
    if named:  # PEFT saves an adapter not named "default" in a folder of its name
        raise InputError(
            f"{path}: holds adapters in folders of their own ({', '.join(p.name for p in named[:5])}) but "
            f"none at the top. Pass one of them, e.g. {named[0]}."
        )
    if (path / "config.json").exists():
        raise InputError(
            f"{path}: is a model directory, not an adapter (no {CONFIG}). Pass the adapter "
            "directory as ADAPTER and this one with --base."
        )
    raise InputError(f"{path}: no {CONFIG}, so this is not a PEFT adapter directory.")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_settings(config: dict, where: Path) -> LoraSettings:
    """The LoraConfig fields the merge uses, each checked (an InputError names the key)."""
    here = f"{where}/{CONFIG}"
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if type(r) is not int or r <= 0:
        raise InputError(f"{here}: r is {r!r}; a LoRA rank is a positive integer.")
    if not _number(alpha):
        raise InputError(f"{here}: lora_alpha is {alpha!r}; expected a finite number.")
    patterns = {}
    for key, valid, what in (
        ("rank_pattern", lambda v: type(v) is int and v > 0, "positive integer ranks"),
        ("alpha_pattern", _number, "finite numbers"),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise InputError(f"{here}: {key} is not an object of module patterns.")
        for k, v in pattern.items():
            if not valid(v):
                raise InputError(f"{here}: {key}[{k!r}] is {v!r}; expected {what}.")
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as e:
                raise InputError(f"{here}: {key} key {k!r} is not a valid regular expression ({e}).") from e
        patterns[key] = dict(pattern)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), bool):
            raise InputError(f"{here}: {key} is {config.get(key)!r}; expected true or false.")
    return LoraSettings(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=config.get("use_rslora", False),
        use_dora=config.get("use_dora", False),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        fan_in_fan_out=config.get("fan_in_fan_out", False),
    )


class Adapter:
    """A PEFT LoRA adapter: its config, settings, and lazily read tensors."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = resolve_adapter_dir(path)
        self.config = read_json(self.path / CONFIG)
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UnsupportedError(
                f"{self.path}: adapter type {peft_type} is not supported; qmerge merges LoRA adapters "
                "(including rsLoRA and DoRA)."
            )
        for key, what in _UNSUPPORTED_OPTIONS.items():
            if self.config.get(key):
                raise UnsupportedError(f"{self.path}/{CONFIG}: {key} ({what}) is not supported.")
        init = self.config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
            raise UnsupportedError(
                f"{self.path}: init_lora_weights={init!r} changes the base weights during training; merging "
                "such an adapter needs the converted base, which qmerge does not support."
            )
        self.settings = read_settings(self.config, self.path)
        self.store: TensorStore = open_store(self.path, "adapter_model", allow_pickle)
        self.layout = layout_adapter(self.store.keys(), self.path, self.config.get("trainable_token_indices"))

    @property
    def base_model_name_or_path(self) -> str | None:
        named = self.config.get("base_model_name_or_path")
        return named if isinstance(named, str) and named else None

    @property
    def target_modules(self) -> list[str] | str | None:
        t = self.config.get("target_modules")
        return sorted(t) if isinstance(t, list) else t

    @property
    def target_parameters(self) -> list[str]:
        """adapter_config.json's target_parameters (LoRA on parameters), [] without any."""
        t = self.config.get("target_parameters") or []
        return [t] if isinstance(t, str) else [v for v in t if isinstance(v, str)]

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    def get(self, key: str) -> torch.Tensor:
        return self.store.get(key)


_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector(?:\.weight)?)$"
)
_PART_FIELD = {
    "lora_A.weight": ("lora_A", None),
    "lora_B.weight": ("lora_B", None),
    "lora_B.bias": ("lora_B_bias", None),
    "lora_embedding_A": ("lora_A", "embedding"),
    "lora_embedding_B": ("lora_B", "embedding"),
}


_TOKENS_KEY = ".token_adapter.trainable_tokens_delta"


def _token_rows(module: str, indices: object, where: Path) -> tuple[int, ...]:
    """The token ids PEFT's trainable_token_indices gives `module`: a list (the input embedding), or
    {layer name or suffix: list}."""
    if isinstance(indices, dict):
        found = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
        if len(found) != 1:
            raise InputError(
                f"{where}/{CONFIG}: trainable_token_indices names {len(found)} entries for {module}; "
                "expected exactly one."
            )
        indices = found[0]
    if not isinstance(indices, list) or not indices or not all(type(i) is int and i >= 0 for i in indices):
        raise InputError(f"{where}/{CONFIG}: trainable_token_indices is {indices!r}; expected token ids.")
    if len(set(indices)) != len(indices):
        raise InputError(f"{where}/{CONFIG}: trainable_token_indices repeats a token id.")
    return tuple(indices)


def layout_adapter(keys: list[str], where: Path, token_indices: object = None) -> AdapterLayout:
    """Sort adapter tensor keys into LoRA modules, whole-tensor replacements and trainable-token rows;
    reject anything else."""
    parts: dict[str, dict] = {}
    replace: dict[str, str] = {}
    rows: dict[str, tuple[str, tuple[int, ...]]] = {}
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
            module = m["module"]
            depth = module.count(".base_layer")  # nested ParamWrappers (target_parameters)
            fields = parts.setdefault(module, {"module": module.replace(".base_layer", ""), "depth": depth})
            attr, kind = _PART_FIELD.get(m["part"], ("magnitude", None))
            fields[attr] = key
            if kind:
                fields["kind"] = kind
            continue
        if ".lora_" in rest:
            raise UnsupportedError(f"{where}: adapter tensor {key!r} is a LoRA part qmerge does not know.")
        if rest.endswith(_TOKENS_KEY):
            if token_indices is None:
                raise InputError(
                    f"{where}: adapter tensor {key!r} but no trainable_token_indices in {CONFIG}."
                )
            module = rest[: -len(_TOKENS_KEY)]
            rows[module + ".weight"] = (key, _token_rows(module, token_indices, where))
            continue
        # modules_to_save, bias="all"/"lora_only", and saved embedding base layers replace base tensors.
        target = rest.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
        if target in replace:
            raise InputError(
                f"{where}: adapter tensors {replace[target]!r} and {key!r} both replace {target!r}."
            )
        replace[target] = key
    lora = {name: LoraModule(**f) for name, f in parts.items()}  # keyed as saved (".base_layer" kept)
    for mod in lora.values():
        if mod.lora_A is None or mod.lora_B is None:
            raise InputError(
                f"{where}: module {mod.module!r} has only one of lora_A/lora_B; the adapter is incomplete."
            )
    return AdapterLayout(lora, replace, rows)


def selects_none(adapter: Adapter) -> bool:
    """Whether adapter_config.json's target_modules (with exclude_modules, layers_to_transform,
    layers_pattern, modules_to_save) select none of the modules the adapter holds LoRA tensors for, so that
    PEFT refuses to load it. Decided by PEFT's own matching rule (importing PEFT costs seconds), except where
    the rule PEFT documents for target_modules alone (a name or name suffix in the list, a full regex match
    for a string) selects a module and no other key could deselect it."""
    cfg = adapter.config
    targets = cfg.get("target_modules")
    if not adapter.layout.lora or targets is None or targets == "all-linear":
        return False
    modules = [m.module for m in adapter.layout.lora.values()]
    if not any(cfg.get(k) for k in _DESELECTING) and any(_named(m, targets, cfg) for m in modules):
        return False  # selected by the documented rule: no need for PEFT
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = SimpleNamespace(
        target_modules=set(targets) if isinstance(targets, list) else targets,
        **{k: cfg.get(k) for k in _SELECTION_KEYS},
    )

    def selected(module: str) -> bool:
        found = check_target_module_exists(config, module)
        return bool(found) and not isinstance(found, _ExcludedModule)

    return not any(selected(m) for m in modules)


def _named(module: str, targets, cfg: dict) -> bool:
    """target_modules as PEFT documents them select `module`, which no modules_to_save entry names."""
    if set(module.split(".")) & set(cfg.get("modules_to_save") or ()):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


# The adapter_config.json keys PEFT's check_target_module_exists reads besides target_modules; of those, the
# ones that can deselect a module target_modules names.
_SELECTION_KEYS = (
    "target_parameters",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)
_DESELECTING = ("exclude_modules", "layers_to_transform", "layers_pattern")
