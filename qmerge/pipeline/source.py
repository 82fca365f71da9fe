"""What an export reads: a base model directory and, usually, a LoRA adapter trained on it.

A Source pairs the two (tied weights an adapter changes become untied copies; GPT-2 style Conv1D weights
are known), lists the output model's tensors once (TensorSpec), and reads adapter tensors checked for
NaN/Inf. A model directory without an adapter (a merged model, a base) is a Source with an empty layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, MismatchError, OptionError
from ..io.adapter import Adapter, AdapterLayout
from ..io.atomic import Inputs
from ..io.hf_classes import classifier_of
from ..io.hf_dir import ModelDir
from ..io.hub import cached_snapshot, local_directory, parse_hub_id
from ..lora.scaling import LoraSettings
from ..names import MERGE_BASES
from .base import QuantSettings, TrainingWeights
from .params import as_parameters
from .quantization import Quantization, establish_quantization


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the output model, as a 16-bit Hugging Face checkpoint stores it."""

    name: str
    shape: tuple[int, ...]
    floating: bool  # floating tensors are written in the output's dtype, others as stored
    stored: torch.dtype | None  # the base's dtype for it (None: made by the adapter alone)


def resolve_base_path(adapter: Adapter, base: Path | None) -> Path:
    """--base if given (a directory, or a Hub id in the local Hugging Face cache), else the adapter's
    base_model_name_or_path: a directory (as given, or relative to the adapter, as TRL saves it), or a Hub
    id in the cache (at the adapter's `revision` when it names one)."""
    if base is not None:
        hub = None if Path(base).is_dir() else parse_hub_id(str(base))
        return cached_snapshot(*hub, named_by="--base ") if hub else Path(base)
    named = adapter.base_model_name_or_path
    if named:
        found = local_directory(named, adapter.path)
        if found is not None:
            return found
        hub = parse_hub_id(named)
        if hub is not None:
            revision = hub[1] or adapter.config.get("revision") or None
            return cached_snapshot(hub[0], revision, f"{adapter.path}/adapter_config.json's base ")
        raise InputError(
            f"{adapter.path}/adapter_config.json names base {named!r}, which is neither a local directory "
            "(as given, or relative to the adapter) nor a Hub id: pass the base model directory with --base."
        )
    raise InputError(f"{adapter.path}: the adapter names no base model; pass it with --base DIR.")


def quant_settings_for(
    adapter: Adapter | None, override: QuantSettings | None, base: ModelDir | None = None
) -> QuantSettings:
    """The quantization training used (quantization.establish_quantization's settings)."""
    return establish_quantization(adapter, base, override).settings


class Source:
    """An adapter (or none) with its base, opened lazily: nothing is read until tensors are asked for."""

    def __init__(
        self,
        base: ModelDir,
        adapter: Adapter | None = None,
        quant: QuantSettings = QuantSettings(),
        merge_base: str = "dequantized",
    ):
        if merge_base not in MERGE_BASES:
            raise OptionError(f"merge_base must be one of {', '.join(MERGE_BASES)}, got {merge_base!r}.")
        if merge_base == "original" and base.is_4bit:
            raise InputError(
                f"{base.path}: --merge-base original needs the 16-bit base, but this base is saved in 4-bit. "
                "Pass the 16-bit base with --base, or use --merge-base dequantized."
            )
        self.base, self.adapter, self.quant, self.merge_base = base, adapter, quant, merge_base
        self.layout: AdapterLayout = (
            _as_stored(as_parameters(adapter.layout, base, adapter), base)
            if adapter is not None
            else AdapterLayout()
        )
        self.settings: LoraSettings | None = adapter.settings if adapter is not None else None
        # GPT-2 style Conv1D weights: [in, out] on disk, quantized by bitsandbytes as [out, in].
        self.conv1d = base.conv1d_weights()
        self.weights = TrainingWeights(base, quant, merge_base, self.conv1d)
        self.aliases = self._untied_aliases()
        # a SEQ_CLS fine-tune's output config (the classifier transformers builds on the base), else None
        self.task_config = classifier_of(base.config, adapter, self.layout) if adapter is not None else None
        self.tensors = self._specs()
        self.base_check = None  # a fit.BackgroundCheck while config.json is checked in a child process
        self.warnings: list[str] = []  # what the fit check warns of (said in every command's output)
        self.gguf_name: str | None = None  # a GGUF's general.name, when the user names it (export name=)
        self.card_check: dict | None = None  # a check report whose figures the model card shows
        self.mmproj: Path | None = None  # a vision projector GGUF written beside a GGUF (export mmproj=)
        self._param_deltas = None
        # how training quantized the base, and how qmerge knows (open_checkpoint establishes it)
        self.quantization: Quantization | None = Quantization.of_checkpoint(base) if base.is_4bit else None

    def _untied_aliases(self) -> dict[str, str]:
        """Tied weights the merged model must carry on their own: {name absent from the base: the base
        tensor it is tied to, which it starts from}. Written untied.

        - The adapter changes the tied weight itself (modules_to_save, or LoRA on lm_head): PEFT trained a
          separate copy of it.
        - The adapter changes the tensor it is tied to (LoRA on embed_tokens, or embed_tokens in
          modules_to_save) and was not trained with `ensure_weight_tying`: PEFT's forward leaves the tied
          weight (lm_head) as the base has it, so it stays the base tensor while the other one changes.
          (PEFT's own merge_and_unload writes such a model tied, with the changed tensor as both.)
        """
        names = set(self.base.weight_names())
        touched = set(self.layout.replace) | {m.weight for m in self.layout.lora.values()}
        if not (touched - names) and not self._touches_vocabulary(touched & names):
            return {}  # no tie can be involved: transformers (which knows the ties) is not imported
        from ..io.hf_meta import tied_weights

        follows = bool(self.adapter and self.adapter.config.get("ensure_weight_tying"))
        saved_as = self.base.stored_as()
        tied = {saved_as.get(a, a): saved_as.get(b, b) for a, b in tied_weights(self.base.config).items()}
        return {
            name: to
            for name, to in tied.items()
            if name not in names and to in names and (name in touched or (to in touched and not follows))
        }

    def _touches_vocabulary(self, names: set[str]) -> bool:
        """Whether any of these base tensors is an embedding or output layer (rows: the vocabulary), the
        only tensors models tie."""
        vocab = self.base.config.get("vocab_size")
        shapes = [self.base.logical_shape(n) for n in names]
        return any(m.kind == "embedding" for m in self.layout.lora.values()) or any(
            len(shape) == 2 and (vocab is None or shape[0] == vocab) for shape in shapes
        )

    def _specs(self) -> dict[str, TensorSpec]:
        """The output model's tensors, sorted by name: the base's (a Conv1D weight in its 16-bit
        orientation), untied copies, and the adapter's whole-tensor replacements (their own shape)."""
        base, specs = self.base, {}
        for name in base.weight_names():
            if name in base.quantized:
                specs[name] = TensorSpec(name, self.base_shape(name), True, base.quantized[name].dtype)
            else:
                dt = base.store.dtype(name)
                specs[name] = TensorSpec(name, self.base_shape(name), dt.is_floating_point, dt)
        for alias, source in self.aliases.items():
            specs[alias] = TensorSpec(alias, specs[source].shape, True, specs[source].stored)
        if self.task_config is not None:  # the classifier has no language-model head
            from ..io.hf_meta import expected_shapes

            expected = expected_shapes(self.task_config)[0]
            specs = {n: t for n, t in specs.items() if n in expected}
        for target, key in self.layout.replace.items():
            shape = tuple(self.adapter.store.shape(key))
            old = specs.get(target)
            specs[target] = TensorSpec(
                target, shape, old.floating if old else True, old.stored if old else None
            )
        return dict(sorted(specs.items()))

    def base_shape(self, name: str) -> tuple[int, ...]:
        """Shape of base tensor `name` as a 16-bit checkpoint stores it (a 4-bit Conv1D state is transposed)."""
        shape = self.base.logical_shape(name)
        return tuple(reversed(shape)) if name in self.base.quantized and name in self.conv1d else shape

    @property
    def config(self) -> dict:
        """The output model's config.json: the base's (a SEQ_CLS fine-tune's classifier), untied where the
        adapter changed a tied weight."""
        config = self.task_config or self.base.config
        if not self.aliases:
            return config
        return {**config, "tie_word_embeddings": False}

    @property
    def name(self) -> str:
        """A name for the output model: the adapter's directory, else the model's."""
        return (self.adapter.path.name if self.adapter else self.base.path.name) or "model"

    @property
    def param_deltas(self):
        """The deltas of LoRA on parameters (target_parameters), by stored tensor (params.ParamDeltas)."""
        if self._param_deltas is None:
            from .params import ParamDeltas

            self._param_deltas = ParamDeltas(self)
        return self._param_deltas

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer is: the adapter's own when it has one, else the base's."""
        if self.adapter is not None and any(
            (self.adapter.path / f).exists() for f in ("tokenizer.json", "tokenizer.model")
        ):
            return self.adapter.path
        return self.base.path

    def inputs(self) -> Inputs:
        """The directories and files this source reads (an output may touch none of them)."""
        dirs = [self.base.path] + ([self.adapter.path] if self.adapter else [])
        files = [*self.base.store.files, self.base.path / "config.json", *self.base.side_files()]
        if self.adapter is not None:
            files += [*self.adapter.store.files, self.adapter.path / "adapter_config.json"]
        return Inputs(dirs, files, self.confirm)

    def confirm(self) -> None:
        """Raise what the config check still running in the background found (fit.check_fit): every output
        made from this source waits for it before it is committed."""
        from .fit import confirm

        confirm(self)

    def adapter_tensor(self, key: str) -> torch.Tensor:
        """An adapter tensor in fp32, refused when it holds NaN or Inf."""
        t = self.adapter.get(key).float()
        if not torch.isfinite(t).all():
            raise InputError(
                f"{self.adapter.path}: adapter tensor {key} contains NaN or Inf; the adapter is broken."
            )
        return t


def _as_stored(layout: AdapterLayout, base: ModelDir) -> AdapterLayout:
    """The adapter's targets under the names the base checkpoint stores them by (PEFT names the modules
    of the model transformers builds, which renames some at load time, e.g. GPT-NeoX's embed_out ->
    lm_head)."""
    from dataclasses import replace

    targets = {m.weight for m in layout.lora.values()} | set(layout.replace) | set(layout.rows)
    if targets <= set(base.weight_names()):
        return layout  # nothing renamed (and transformers, which only a renamed target needs, not imported)
    renamed = {m: c for m, c in base.stored_as().items() if m != c}
    if not renamed:
        return layout
    return AdapterLayout(
        {
            k: replace(m, stored_as=renamed[m.weight]) if m.weight in renamed else m
            for k, m in layout.lora.items()
        },
        {renamed.get(t, t): key for t, key in layout.replace.items()},
        {renamed.get(t, t): v for t, v in layout.rows.items()},
    )


def open_checkpoint(
    adapter_path: Path,
    base_path: Path | None = None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    allow_pickle: bool = False,
    background: bool = False,
    allow_other_base: bool = False,
) -> Source:
    """Open an adapter with its base and check that they fit together (raises on any error; with
    background, the config check may still be running: see fit.check_fit). A base given that is another
    model than the one the adapter names (when that one is here) is refused unless allow_other_base."""
    from .fit import check_fit
    from .identity import confirm_base

    adapter = Adapter(adapter_path, allow_pickle)
    base = ModelDir(resolve_base_path(adapter, base_path), allow_pickle)
    if not adapter.layout.lora and not adapter.layout.replace and not adapter.layout.rows:
        raise InputError(f"{adapter.path}: the adapter holds no LoRA tensors.")
    found = establish_quantization(adapter, base, quant)
    source = Source(base, adapter, found.settings, merge_base)
    source.quantization = found
    try:
        source.warnings += confirm_base(adapter, base, base_path is not None, allow_other_base)
    except MismatchError:
        check_fit(source)  # a base at odds with itself is refused for that, which says more
        raise
    source.warnings += found.warnings
    check_fit(source, background)
    return source


def open_source(
    path: Path,
    base_path: Path | None = None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    allow_pickle: bool = False,
    background: bool = False,
    allow_other_base: bool = False,
) -> Source:
    """A QLoRA checkpoint (adapter dir) or an already merged / plain model directory, as a tensor source."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        if base_path is not None:
            raise InputError(
                f"{path} is a model directory, not an adapter; --base applies only to an adapter."
            )
        from .fit import check_fit

        base = ModelDir(path, allow_pickle)
        source = Source(base, None, quant or QuantSettings(), "dequantized" if base.is_4bit else "original")
        check_fit(source, background)
        return source
    return open_checkpoint(path, base_path, quant, merge_base, allow_pickle, background, allow_other_base)
