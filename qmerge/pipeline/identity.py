"""Is the base given the base the adapter was trained on?

The adapter names its base (adapter_config.json's base_model_name_or_path) and qmerge's training record
names the directory it trained from. When one of those is here (a directory as named, one beside the
adapter, or a Hub id in the local cache) and is not the base given, the two are compared: the config (the
keys that shape the computation), every tensor's name and shape (a 4-bit checkpoint by the shapes of the
weights it packs), and a fingerprint of the weights both store unquantized (the first values of a few
tensors, compared in the coarser of the two dtypes, so that a 4-bit re-upload of a bf16 model matches its
original exactly). Another model is refused unless the user allows it; when neither named base is here,
names that do not match are a warning.
"""

from __future__ import annotations

import math
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MismatchError, QmergeError
from ..io.adapter import Adapter
from ..io.hf_dir import ModelDir
from ..io.hub import cached_snapshot, local_directory, parse_hub_id
from ..io.records import TRAINING_RECORD, identify, read_json

# config keys that differ between copies of one model (how it was saved, loaded or quantized): not compared
_IGNORED = re.compile(
    r"^(transformers_version|_name_or_path|torch_dtype|dtype|quantization_config|use_cache|"
    r"_attn_implementation.*|_commit_hash|unsloth_.*)$"
)
# keys that do not change the computation: a difference is said, but does not make another model
_MINOR = re.compile(r"^(architectures|auto_map|pretraining_tp|model_name)$|_token_ids?$")
FINGERPRINT_VALUES = 4096  # values read per tensor
FINGERPRINT_TENSORS = 4  # tensors read (spread over the model)
ALLOW = "--allow-other-base"


@dataclass(frozen=True)
class NamedBase:
    """A base the adapter's own files name, found here."""

    path: Path
    label: str  # as named (a Hub id, or a directory's name: no local path, it may be published)
    via: str  # which file names it


def named_bases(adapter: Adapter) -> list[NamedBase]:
    """The bases adapter_config.json and qmerge_training.json name that are here, each once."""
    found: dict[Path, NamedBase] = {}
    named = adapter.base_model_name_or_path
    if named:
        path = find_named(adapter, named)
        if path is not None:
            found.setdefault(path.resolve(), NamedBase(path, label(adapter, named), "adapter_config.json"))
    record = adapter.path / TRAINING_RECORD
    if record.is_file():
        base = read_json(record).get("base")
        if isinstance(base, str) and base and Path(base).is_dir():
            found.setdefault(Path(base).resolve(), NamedBase(Path(base), Path(base).name, TRAINING_RECORD))
    return list(found.values())


def label(adapter: Adapter, named: str) -> str:
    """How to name a base_model_name_or_path in outputs: a directory by its name (no local path: outputs
    may be published), anything else (a Hub id) as written."""
    return Path(named).name if local_directory(named, adapter.path) else named


def find_named(adapter: Adapter, named: str) -> Path | None:
    """The directory `named` (a base_model_name_or_path) is here: as given, beside the adapter, or a Hub id
    in the local cache (at the adapter's revision); None when it is not here."""
    found = local_directory(named, adapter.path)
    if found is not None:
        return found
    hub = parse_hub_id(named)
    if hub is None:
        return None
    try:
        return cached_snapshot(hub[0], hub[1] or adapter.config.get("revision") or None)
    except QmergeError:
        return None


def confirm_base(adapter: Adapter, base: ModelDir, explicit: bool, allow_other: bool = False) -> list[str]:
    """Warnings about the base used (see the module's docstring); a MismatchError when it is another model
    than a named base found here, unless `allow_other`."""
    warnings: list[str] = []
    compared = False
    for named in named_bases(adapter):
        if named.path.resolve() == base.path.resolve():
            compared = True
            continue
        try:
            other = ModelDir(named.path)
        except QmergeError:
            continue  # not a model directory qmerge reads: no evidence
        compared = True
        decisive, minor = differences(base, other)
        what = f"the base the adapter was trained on ({named.label}, named by {named.via})"
        if decisive:
            listed = "; ".join(decisive[:5]) + (
                f"; and {len(decisive) - 5} more" if len(decisive) > 5 else ""
            )
            text = f"{base.path} is another model than {what}: {listed}."
            if not allow_other:
                raise MismatchError(
                    text + " The merge would add the adapter to weights it was not trained on. Pass the base "
                    f"it was trained on, or {ALLOW} if this is intended."
                )
            warnings.append(text + f" Merged anyway ({ALLOW}).")
        elif minor:
            warnings.append(
                f"{base.path} has the weights of {what}, but its config differs in {'; '.join(minor[:5])}: the "
                "model may compute otherwise than in training."
            )
    named = adapter.base_model_name_or_path
    if explicit and not compared and named and not names_match(named, base):
        warnings.append(
            f"the adapter was trained on {named!r} (adapter_config.json); the base given is {base.path.name!r}, "
            "which qmerge cannot compare with it (the named base is not here). Make sure it is the same model."
        )
    return warnings


def differences(given: ModelDir, named: ModelDir) -> tuple[list[str], list[str]]:
    """(differences that make another model, differences that do not).

    Other weights (tensor names, shapes, or the fingerprint) make another model. A config that differs over
    the same weights is an edited copy of the same model: said, not refused (a config that no longer fits
    its weights is refused by the fit check, with a message about that base alone), unless no weights
    could be compared, when the config is all there is to go by."""
    decisive, minor, config = [], [], []
    a, b = given.config, named.config
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key) and not _IGNORED.search(key):
            (minor if _MINOR.search(key) else config).append(
                f"config {key}: {_short(a.get(key))} vs {_short(b.get(key))}"
            )
    pairs, ours, theirs = _paired(given, named)
    for name, side in ((ours, "only in the base given"), (theirs, "only in it")):
        if name:
            decisive.append(
                f"{len(name)} tensors {side} ({', '.join(name[:3])}{', ...' if len(name) > 3 else ''})"
            )
    conv1d = _conv1d(given) | _conv1d(named)
    for a, b in pairs:
        a_shape, b_shape = _stored_shape(given, a, conv1d), _stored_shape(named, b, conv1d)
        if a_shape != b_shape:
            decisive.append(f"{a} is {list(a_shape)} vs {list(b_shape)}")
    fingerprint = None if decisive else _fingerprint(given, named, pairs)
    if fingerprint:
        return decisive + fingerprint + config, minor
    if fingerprint is None:
        return decisive + config, minor
    return decisive, config + minor  # the same weights: a config edit is said


def _paired(given: ModelDir, named: ModelDir) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """([(its name in given, in named)] for the tensors both store, those only given stores, those only named
    stores). Where the names differ, they are compared as transformers loads them: the same weights stored
    in two layouts (a release's names and a re-save's, e.g. GPT-2's h.0.* and transformer.h.0.*) pair up, and
    tensors transformers ignores at load (GPT-2's causal-mask buffers) do not count."""
    ours = {n: n for n in given.weight_names()}
    theirs = {n: n for n in named.weight_names()}
    if ours.keys() != theirs.keys():
        with suppress(QmergeError):  # (a config transformers cannot build: the names as stored)
            ours, theirs = _as_loaded(given), _as_loaded(named)
    pairs = [(ours[k], theirs[k]) for k in sorted(ours.keys() & theirs.keys())]
    only = (
        sorted(ours[k] for k in ours.keys() - theirs.keys()),
        sorted(theirs[k] for k in theirs.keys() - ours.keys()),
    )
    return pairs, *only


def _as_loaded(model: ModelDir) -> dict[str, str]:
    """{the model's parameter name: the stored name}, less the tensors transformers ignores at load."""
    from ..io.hf_meta import unexpected_ok

    loaded = {stored: param for param, stored in model.stored_as().items()}
    ignored = unexpected_ok(model.config)
    return {loaded.get(n, n): n for n in model.weight_names() if n in loaded or not ignored(n)}


def _conv1d(model: ModelDir) -> frozenset[str]:
    """GPT-2 style Conv1D weights, which a 4-bit checkpoint packs transposed (only asked of a 4-bit one)."""
    return model.conv1d_weights() if model.is_4bit else frozenset()


def _stored_shape(model: ModelDir, name: str, conv1d: frozenset[str]) -> tuple[int, ...]:
    """The shape of `name` as a 16-bit checkpoint stores it."""
    shape = tuple(model.logical_shape(name))
    return tuple(reversed(shape)) if name in model.quantized and name in conv1d else shape


def _fingerprint(given: ModelDir, named: ModelDir, pairs: list[tuple[str, str]]) -> list[str] | None:
    """Differences in the first values of a few tensors both store unquantized (floating point); None when
    there is no such tensor. `pairs`: each tensor's name in given and in named."""
    plain = [
        (a, b)
        for a, b in pairs
        if a not in given.quantized
        and b not in named.quantized
        and given.store.dtype(a).is_floating_point
        and named.store.dtype(b).is_floating_point
        and given.store.shape(a)
    ]
    if not plain:
        return None
    step = max(1, len(plain) // FINGERPRINT_TENSORS)
    out = []
    for name, theirs in plain[::step][:FINGERPRINT_TENSORS]:
        x, y = _first_values(given, name), _first_values(named, theirs)
        dtype = _coarser(x.dtype, y.dtype)
        x, y = x.to(dtype).float(), y.to(dtype).float()
        differ = int((x != y).sum())
        if differ > len(x) // 1000:  # a few values may differ where a cast flushed a subnormal
            out.append(
                f"weights of {name} differ ({differ} of its first {len(x)} values, by up to "
                f"{float((x - y).abs().max()):.3g})"
            )
    return out


def _first_values(model: ModelDir, name: str) -> torch.Tensor:
    shape = model.store.shape(name)
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows = min(shape[0], max(1, math.ceil(FINGERPRINT_VALUES / per_row)))
    return model.store.get(name, rows=(0, rows)).flatten()[:FINGERPRINT_VALUES]


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both values survive a cast to unchanged when they came from the same weights."""
    for dtype in (torch.bfloat16, torch.float16):
        if dtype in (a, b):
            return dtype
    return torch.float32


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# what re-uploads append to a model's name (4-bit copies of the same weights)
_SUFFIXES = re.compile(r"(-unsloth)?(-bnb)?(-4bit|-nf4|-fp4)?$")


def names_match(named: str, base: ModelDir) -> bool:
    """Whether the base given carries the name the adapter names (its directory's name, its Hub id in a
    cache, or its config's _name_or_path), ignoring case and the suffixes 4-bit re-uploads add."""

    def norm(text: str) -> str:
        return _SUFFIXES.sub("", text.rstrip("/").rsplit("/", 1)[-1].lower())

    ids = identify(base.path)
    names = [base.path.name, ids.get("hub_id", ""), str(base.config.get("_name_or_path") or "")]
    return norm(named) in {norm(n) for n in names if n}
