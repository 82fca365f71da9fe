"""What to do with each tensor of a QLoRA checkpoint, streamed one tensor at a time.

A QLoRACheckpoint pairs an adapter with its base, checks that they belong together, and yields the
merged model's tensors in fp32: the weights training saw (4-bit layers dequantized exactly as
bitsandbytes does) plus the scaled LoRA delta, DoRA applied, modules_to_save replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError, MismatchError
from .io.adapter import Adapter, LoraModule
from .io.checkpoint import ModelDir, torch_dtype_of
from .lora.delta import add_lora_, dora_merge, embedding_delta, lora_delta
from .lora.scaling import module_rank_alpha, module_scaling
from .quant.blockwise import QuantState, dequantize_4bit, dequantize_rows, quantize_4bit

Progress = Callable[[str, int, int], None]
_FUSED_ELEMENTS = 1 << 18  # elements per row block in the fused merge: about 1 MiB of fp32


@dataclass(frozen=True)
class QuantSettings:
    """How the base was quantized for training (used when the base is given in 16-bit)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dtype: torch.dtype | None = None  # dtype the base was loaded in; None: as stored


@dataclass(frozen=True)
class Problem:
    """A compatibility finding: severity is "error" (merge refuses) or "warning"."""

    severity: str
    message: str


@dataclass
class MergedTensor:
    """One tensor of the merged model."""

    name: str
    value: torch.Tensor  # fp32 for floating tensors, as stored otherwise
    base: torch.Tensor | None = None  # fp32 weight before the adapter, where the adapter changed it
    merged: bool = False  # a LoRA delta, DoRA or replacement was applied


@dataclass
class TensorPlan:
    """The merged model's tensors: name -> shape, and which are floating point."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    floating: dict[str, bool] = field(default_factory=dict)


def resolve_base_path(adapter: Adapter, base: Path | None) -> Path:
    """--base if given, else the adapter's base_model_name_or_path when it is a local directory."""
    if base is not None:
        return Path(base)
    named = adapter.base_model_name_or_path
    if named:
        for candidate in (Path(named), adapter.path / named):
            if candidate.is_dir():
                return candidate
        raise InputError(
            f"{adapter.path}/adapter_config.json names base {named!r}, which is not a local directory. qmerge "
            "downloads nothing: pass the base model directory with --base."
        )
    raise InputError(f"{adapter.path}: the adapter names no base model; pass it with --base DIR.")


def quant_settings_for(
    base: ModelDir, adapter: Adapter | None, override: QuantSettings | None
) -> QuantSettings:
    """The quantization training used: --quant-* options, else qmerge's training record, else QLoRA defaults."""
    if override is not None:
        return override
    if adapter is not None and (adapter.path / "qmerge_training.json").exists():
        from .io.checkpoint import read_json

        rec = read_json(adapter.path / "qmerge_training.json").get("quantization", {})
        return QuantSettings(
            quant_type=rec.get("quant_type", "nf4"),
            blocksize=int(rec.get("blocksize", 64)),
            double_quant=bool(rec.get("double_quant", True)),
            dtype=torch_dtype_of(rec["dtype"]) if rec.get("dtype") else None,
        )
    return QuantSettings()


class QLoRACheckpoint:
    """An adapter and its base, opened lazily. Nothing is loaded until tensors are iterated."""

    def __init__(
        self,
        adapter: Adapter | None,
        base: ModelDir,
        quant: QuantSettings = QuantSettings(),
        merge_base: str = "dequantized",
    ):
        if merge_base not in ("dequantized", "original"):
            raise ValueError(f"merge_base must be 'dequantized' or 'original', got {merge_base!r}")
        if merge_base == "original" and base.is_4bit:
            raise InputError(
                f"{base.path}: --merge-base original needs the 16-bit base, but this base is saved in 4-bit. "
                "Pass the 16-bit base with --base, or use --merge-base dequantized."
            )
        self.adapter = adapter
        self.base = base
        self.quant = quant
        self.merge_base = merge_base
        self._names = base.weight_names()
        self._quantized: frozenset[str] | None = None
        self._last_source: tuple[str, tuple[torch.Tensor, QuantState] | None] | None = None
        self.aliases = self._untied_aliases()
        from .io.hf_meta import conv1d_weights

        # GPT-2 style Conv1D weights: [in, out] on disk, quantized by bitsandbytes as [out, in].
        self.conv1d = conv1d_weights(base.config)

    # ---- what is in the model -------------------------------------------------------------------
    def quantized_names(self) -> frozenset[str]:
        """Weights that are 4-bit in the base, or that transformers would quantize at load time."""
        if self._quantized is None:
            if self.base.is_4bit:
                self._quantized = frozenset(self.base.quantized)
            else:
                from .io.hf_meta import quantized_linears

                skip = (self.base.quantization_config or {}).get("llm_int8_skip_modules")
                self._quantized = frozenset(quantized_linears(self.base.config, skip)) & set(self._names)
        return self._quantized

    def _untied_aliases(self) -> dict[str, str]:
        """Tied weights the adapter changes: {name absent from the base: the tensor it is tied to}.

        PEFT trains a separate copy of a tied weight (modules_to_save, or LoRA on lm_head), so the merged
        model must carry it on its own and be written untied.
        """
        if self.adapter is None:
            return {}
        names = set(self._names)
        touched = set(self.adapter.layout.replace) | {
            m.module + ".weight" for m in self.adapter.layout.lora.values()
        }
        missing = touched - names
        if not missing:
            return {}
        from .io.hf_meta import tied_weights

        tied = tied_weights(self.base.config)
        return {n: tied[n] for n in missing if tied.get(n) in names}

    @property
    def config(self) -> dict:
        """The merged model's config.json: the base's, untied where the adapter changed a tied weight."""
        if not self.aliases:
            return self.base.config
        return {**self.base.config, "tie_word_embeddings": False}

    def _disk_shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name` in a 16-bit checkpoint (a 4-bit Conv1D weight's state holds it transposed)."""
        shape = self.base.logical_shape(name)
        return tuple(reversed(shape)) if name in self.base.quantized and name in self.conv1d else shape

    def plan(self) -> TensorPlan:
        """Names, shapes and floating-ness of the merged model's tensors."""
        plan = TensorPlan()
        for name in self._names:
            plan.shapes[name] = self._disk_shape(name)
            plan.floating[name] = name in self.base.quantized or self.base.store.dtype(name).is_floating_point
        for alias, source in self.aliases.items():
            plan.shapes[alias] = self.base.logical_shape(source)
            plan.floating[alias] = True
        if self.adapter is not None:
            for target, key in self.adapter.layout.replace.items():
                plan.shapes[target] = self.adapter.store.shape(key)
                plan.floating.setdefault(target, True)
        return plan

    # ---- compatibility ----------------------------------------------------------------------------
    def problems(self) -> list[Problem]:
        """Everything that would make the merge wrong or impossible, found from shapes and config alone."""
        found: list[Problem] = []
        if self.adapter is None:
            return found
        ad, names = self.adapter, set(self._names) | set(self.aliases)
        for mod in ad.layout.lora.values():
            found += self._module_problems(mod, names)
        for target, key in ad.layout.replace.items():
            if target not in names:
                found.append(
                    Problem("error", f"adapter tensor {key} replaces {target}, which the base does not have.")
                )
        lora_targets = {m.module + (".weight") for m in ad.layout.lora.values()}
        if ad.settings.lora_alpha == 0 and lora_targets:
            found.append(
                Problem(
                    "warning", "lora_alpha is 0: every LoRA scaling is zero and the adapter changes nothing."
                )
            )
        return found

    def _module_problems(self, mod: LoraModule, names: set[str]) -> list[Problem]:
        ad = self.adapter
        weight = mod.module + ".weight"
        if weight not in names:
            return [
                Problem(
                    "error",
                    f"adapter targets {mod.module}, which the base does not have (no tensor {weight}); "
                    "the adapter was trained on another base.",
                )
            ]
        out: list[Problem] = []
        shape = self.plan_shape(weight)
        a_shape, b_shape = ad.store.shape(mod.lora_A), ad.store.shape(mod.lora_B)
        r, _alpha = module_rank_alpha(ad.settings, mod.module)
        if mod.kind == "embedding" or ad.settings.fan_in_fan_out:
            expected_a, expected_b = (a_shape[0], shape[0]), (shape[1], a_shape[0])
        else:
            expected_a, expected_b = (a_shape[0], shape[1]), (shape[0], a_shape[0])
        if len(shape) != 2 or tuple(a_shape) != expected_a or tuple(b_shape) != expected_b:
            out.append(
                Problem(
                    "error",
                    f"{mod.module}: base weight is {list(shape)} but lora_A is {list(a_shape)} and lora_B "
                    f"{list(b_shape)}; the adapter was trained on another base.",
                )
            )
        elif a_shape[0] != r:
            out.append(
                Problem(
                    "error",
                    f"{mod.module}: adapter_config.json gives rank {r} but lora_A has {a_shape[0]} rows; "
                    "rank_pattern and the tensors disagree.",
                )
            )
        if mod.magnitude is not None:
            if mod.kind == "embedding":
                out.append(Problem("error", f"{mod.module}: DoRA on embeddings is not supported."))
            elif tuple(ad.store.shape(mod.magnitude)) != (
                shape[1] if ad.settings.fan_in_fan_out else shape[0],
            ):
                out.append(
                    Problem(
                        "error",
                        f"{mod.module}: DoRA magnitude has shape {list(ad.store.shape(mod.magnitude))}.",
                    )
                )
        elif ad.settings.use_dora and mod.kind == "linear":
            out.append(
                Problem(
                    "error", f"{mod.module}: use_dora is set but the adapter has no lora_magnitude_vector."
                )
            )
        if mod.lora_B_bias is not None and mod.module + ".bias" not in names:
            out.append(
                Problem("error", f"{mod.module}: the adapter has a LoRA bias but the base layer has no bias.")
            )
        return out

    def plan_shape(self, name: str) -> tuple[int, ...]:
        if self.adapter is not None and name in self.adapter.layout.replace:
            return tuple(self.adapter.store.shape(self.adapter.layout.replace[name]))
        return self._disk_shape(self.aliases.get(name, name))

    def check(self) -> None:
        """Raise MismatchError with every error-level problem, one per line."""
        errors = [p.message for p in self.problems() if p.severity == "error"]
        if errors:
            head = f"{self.adapter.path} does not fit base {self.base.path}:"
            raise MismatchError(
                "\n  ".join([head, *errors[:20]])
                + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
            )

    # ---- tensors ----------------------------------------------------------------------------------
    def quantized_source(self, name: str) -> tuple[torch.Tensor, QuantState] | None:
        """The packed 4-bit codes and state training used for `name`, or None for a 16-bit tensor.

        Read from a 4-bit checkpoint, or reproduced from the 16-bit base exactly as bitsandbytes quantizes
        it at load time (merge_base "dequantized" only). The last answer is kept, so that asking twice for
        the same tensor (a path that declines and falls back) does not quantize it twice.
        """
        if self._last_source is not None and self._last_source[0] == name:
            return self._last_source[1]
        self._last_source = (name, self._quantized_source(name))
        return self._last_source[1]

    def _quantized_source(self, name: str) -> tuple[torch.Tensor, QuantState] | None:
        if name in self.base.quantized:
            return self.base.quant_state(name)
        # merge_base first: a merged or "original" source needs no quantization rule (no transformers import)
        if self.merge_base != "dequantized" or name not in self.quantized_names():
            return None
        tensor = self.base.store.get(name)
        if not tensor.is_floating_point():
            return None
        q = self.quant
        loaded = tensor.to(q.dtype) if q.dtype is not None else tensor
        if name in self.conv1d:  # transformers loads a Conv1D weight into Linear4bit transposed
            loaded = loaded.T.contiguous()
        return quantize_4bit(loaded, q.blocksize, q.quant_type, q.double_quant)

    def base_weight(self, name: str) -> torch.Tensor:
        """The fp32 base tensor the merge starts from (non-float tensors as stored).

        dequantized: exactly the weights training saw, dequantized by the bitsandbytes rule (fp32 product
        cast to the quant_state dtype). original: the 16-bit base tensor.
        """
        source = self.quantized_source(name)
        if source is not None:
            packed, state = source
            weight = dequantize_4bit(packed, state, torch.float32, round_to=state.dtype)
            return weight.T.contiguous() if name in self.conv1d else weight
        tensor = self.base.store.get(self.aliases.get(name, name))  # an untied copy starts from its source
        return tensor.float() if tensor.is_floating_point() else tensor

    def iter_tensors(
        self,
        order: list[str] | None = None,
        progress: Progress | None = None,
        keep_base: bool = False,
        out_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    ) -> Iterator[MergedTensor]:
        """Yield every tensor of the merged model one at a time, in `order` (default: sorted names).

        With keep_base, MergedTensor.base holds a copy of the weight before the adapter (one more tensor
        of memory); without it the adapter is added in place and base is None. With out_dtype, floating
        tensors come in that dtype (the fp32 math is the same; 4-bit layers with a plain LoRA are then
        dequantized, merged and cast row block by row block, while in cache); a dict gives a dtype per
        name (names it lacks come in fp32).
        """
        names = order if order is not None else sorted(self.plan().shapes)
        ad = self.adapter
        by_weight = {m.module + ".weight": m for m in ad.layout.lora.values()} if ad else {}
        by_bias = {m.module + ".bias": m for m in ad.layout.lora.values() if m.lora_B_bias} if ad else {}
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names))
            if i + 1 < len(names):
                nxt = names[i + 1]
                self._read_ahead(nxt, by_weight.get(nxt) or by_bias.get(nxt))
            dtype = out_dtype.get(name) if isinstance(out_dtype, dict) else out_dtype
            t = self._tensor(name, by_weight.get(name), by_bias.get(name), keep_base, dtype)
            if dtype is not None and t.value.is_floating_point():
                t.value = t.value.to(dtype)
            yield t
        if progress:
            progress("", len(names), len(names))

    def _read_ahead(self, name: str, lora: LoraModule | None) -> None:
        """Have the stored tensors that `name` is made from read while the current tensor is computed."""
        if self.adapter is not None:
            if name in self.adapter.layout.replace:
                self.adapter.store.prefetch([self.adapter.layout.replace[name]])
                return
            if lora is not None:
                keys = (lora.lora_A, lora.lora_B, lora.lora_B_bias, lora.magnitude)
                self.adapter.store.prefetch([k for k in keys if k])
        self.base.store.prefetch(self.base.stored_parts(self.aliases.get(name, name)))

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        t = self.adapter.get(key).float()
        if not torch.isfinite(t).all():
            raise InputError(
                f"{self.adapter.path}: adapter tensor {key} contains NaN or Inf; the adapter is broken."
            )
        return t

    def _tensor(
        self,
        name: str,
        lora: LoraModule | None,
        bias_of: LoraModule | None,
        keep_base: bool,
        out_dtype: torch.dtype | None = None,
    ) -> MergedTensor:
        ad = self.adapter
        replaced = ad is not None and name in ad.layout.replace
        if (
            out_dtype is not None
            and not keep_base
            and not replaced
            and name not in self.conv1d
            and lora is not None
            and lora.kind == "linear"
            and lora.magnitude is None
            and not ad.settings.fan_in_fan_out
        ):
            source = self.quantized_source(name)
            if (
                source is not None
                and len(source[1].shape) == 2
                and source[1].shape[1] % source[1].blocksize == 0
            ):
                return MergedTensor(name, self._fused_lora(source, lora, out_dtype), None, merged=True)
        if (
            lora is None
            and bias_of is None
            and not replaced
            and out_dtype is not None
            and name not in self.conv1d
        ):
            source = self.quantized_source(name)
            if source is None:  # untouched 16-bit tensor: straight to the output dtype, no fp32 copy
                raw = self.base.store.get(name)
                return MergedTensor(name, raw.to(out_dtype) if raw.is_floating_point() else raw)
            packed, state = source
            return MergedTensor(name, dequantize_4bit(packed, state, out_dtype, round_to=state.dtype))
        value = self._adapter_tensor(ad.layout.replace[name]) if replaced else self.base_weight(name)
        if lora is None and bias_of is None:
            return MergedTensor(name, value, None, merged=replaced)
        base = value.clone() if keep_base else None
        if lora is not None:
            value = self._apply_lora(value, lora)
        if bias_of is not None:
            value = value + self._adapter_tensor(bias_of.lora_B_bias) * module_scaling(
                ad.settings, bias_of.module
            )
        return MergedTensor(name, value, base, merged=True)

    def _fused_lora(
        self, source: tuple[torch.Tensor, QuantState], mod: LoraModule, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """Dequantize, add scaling * B @ A in fp32 and cast, a block of rows at a time (same math as the
        whole-tensor path: each output element is dequant(W) + scaling * (B @ A), rounded once)."""
        packed, state = source
        rows, cols = state.shape
        scaling = module_scaling(self.adapter.settings, mod.module)
        A, B = self._adapter_tensor(mod.lora_A), self._adapter_tensor(mod.lora_B)
        out = torch.empty(rows, cols, dtype=out_dtype)
        for r0, r1, w in dequantize_rows(
            packed, state, max(1, _FUSED_ELEMENTS // cols), round_to=state.dtype
        ):
            out[r0:r1] = w.addmm_(B[r0:r1], A, alpha=scaling)
        return out

    def _apply_lora(self, weight: torch.Tensor, mod: LoraModule) -> torch.Tensor:
        s = self.adapter.settings
        scaling = module_scaling(s, mod.module)
        A, B = self._adapter_tensor(mod.lora_A), self._adapter_tensor(mod.lora_B)
        if mod.kind == "embedding":
            return weight + embedding_delta(A, B, scaling)
        if mod.magnitude is None and weight.dtype == torch.float32:
            return add_lora_(weight, A, B, scaling, s.fan_in_fan_out)  # in place: no delta-sized temporary
        delta = lora_delta(A, B, scaling, s.fan_in_fan_out)
        if mod.magnitude is None:
            return weight + delta
        magnitude = self._adapter_tensor(mod.magnitude)
        if s.fan_in_fan_out:
            return dora_merge(weight.T, delta.T, magnitude).T.contiguous()
        return dora_merge(weight, delta, magnitude)


def open_checkpoint(
    adapter_path: Path,
    base_path: Path | None = None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    allow_pickle: bool = False,
) -> QLoRACheckpoint:
    """Open an adapter with its base and check that they fit together (raises on any error)."""
    adapter = Adapter(adapter_path, allow_pickle)
    base = ModelDir(resolve_base_path(adapter, base_path), allow_pickle)
    if not adapter.layout.lora and not adapter.layout.replace:
        raise InputError(f"{adapter.path}: the adapter holds no LoRA tensors.")
    ckpt = QLoRACheckpoint(adapter, base, quant_settings_for(base, adapter, quant), merge_base)
    ckpt.check()
    return ckpt


def open_source(
    path: Path,
    base_path: Path | None = None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
    allow_pickle: bool = False,
) -> QLoRACheckpoint:
    """A QLoRA checkpoint (adapter dir) or an already merged / plain model directory, as a tensor source."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        if base_path is not None:
            raise InputError(
                f"{path} is a model directory, not an adapter; --base applies only to an adapter."
            )
        base = ModelDir(path, allow_pickle)
        return QLoRACheckpoint(
            None, base, quant or QuantSettings(), "original" if not base.is_4bit else "dequantized"
        )
    return open_checkpoint(path, base_path, quant, merge_base, allow_pickle)
