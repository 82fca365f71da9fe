"""The merge as a transformers model whose weights exist one module at a time: transformers' own modules
built on the meta device, with accelerate's offload hooks filling each module's weights from a lazy map just
before its forward and dropping them after it (verify/ adds PEFT's LoRA layers for the unmerged reference).

Peak memory is then one module's fp32 weights, the activations and a chunk of logits, whatever the number of
layers. The math is transformers'; the weights are the ones training saw (4-bit layers dequantized by
qmerge's codec, bit-exact with bitsandbytes), a stored model's, or qmerge's merge made on demand.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import torch

from ..io.hf_meta import fuse, fused_at_load, tied_weights
from .source import Source

# Module classes whose weights are used by more than their own forward (PEFT's LoRA layers read
# base_layer.weight for DoRA; a modules_to_save wrapper holds copies; trainable tokens read the
# embedding's weight without calling it; torch's MultiheadAttention, in SigLIP's pooling head, reads its
# out_proj's weight without calling it): all their weights come at once.
WHOLE = [
    "Linear",
    "Embedding",
    "Conv1D",
    "ModulesToSaveWrapper",
    "TrainableTokensWrapper",
    "ParamWrapper",
    "MultiheadAttention",
]
_READ_BLOCK = 32 * 2**20  # bytes of a stored tensor read at a time when it is widened to fp32


@contextlib.contextmanager
def quiet_libraries():
    """Silence library chatter (progress bars, warnings) so that --json stdout stays clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            hf_logging.set_verbosity(level)


def load_tokenizer(*dirs: Path):
    """The first transformers tokenizer found in dirs, or None."""
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and (Path(d) / "tokenizer_config.json").exists():
            with quiet_libraries():
                return AutoTokenizer.from_pretrained(str(d))
    return None


class LazyWeights(Mapping):
    """{parameter name: tensor}, each tensor made when a hook asks for it (and not kept).

    Made on the calling thread: a read-ahead thread measured no faster on 2 cores (the forward's matmuls
    use both) and its allocator arena fragmented, raising peak memory by up to 40% (1.1B check).
    """

    def __init__(self, make: Callable[[str], torch.Tensor], names: list[str]):
        self._make, self._names = make, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._make(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def base_weights(source: Source) -> Callable[[str], torch.Tensor]:
    """A function from a model parameter name to the fp32 weight `source` holds for it: 4-bit layers as
    bitsandbytes dequantizes them, others as stored; renamed (transformers 5) and tied names resolved."""
    config = source.base.config
    saved_as = source.base.stored_as()
    tied = tied_weights(config)
    stored = set(source.base.weight_names())

    def weight(name: str) -> torch.Tensor:
        key = saved_as.get(name, name)
        if key not in stored:  # tied: the tensor it is tied to, under its stored name
            to = tied.get(key, tied.get(name, key))
            key = saved_as.get(to, to)
        if source.weights.is_4bit(key):
            return source.weights.dequantized(key)
        return read_fp32(source.base.store, key)

    return _with_fused(config, weight)


def read_fp32(store, key: str) -> torch.Tensor:
    """A stored tensor in fp32 (non-float tensors as stored), a block of rows at a time into the result: an
    embedding or output layer is never held in both its stored dtype and fp32 (7B: 262 MB less at peak)."""
    dtype, shape = store.dtype(key), store.shape(key)
    if not dtype.is_floating_point or store.nbytes(key) <= _READ_BLOCK or not shape or shape[0] < 2:
        t = store.get(key)
        return t.float() if t.is_floating_point() else t
    out = torch.empty(shape, dtype=torch.float32)
    step = max(1, shape[0] * _READ_BLOCK // store.nbytes(key))
    for r in range(0, shape[0], step):
        out[r : r + step] = store.get(key, (r, min(r + step, shape[0])))
    return out


def model_class_of(path: Path):
    """The transformers class that loads the model directory at `path` as its fine-tune was built: the
    causal LM, vision-language model or classifier its config.json names (io.hf_meta.model_class)."""
    from ..io.files import read_json
    from ..io.hf_classes import model_class

    return model_class(read_json(Path(path) / "config.json"))[0]


def empty_model(source: Source):
    """The model transformers builds from the source's config (hf_meta.model_class: a causal LM, a
    vision-language model, or the sequence classifier a SEQ_CLS adapter was trained as), parameters on the
    meta device (buffers such as rotary frequencies real), in fp32,
    for inference."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from ..io.hf_classes import build_model

    if source.task_config is not None:  # a SEQ_CLS fine-tune: the classifier it was trained as
        from ..io.hf_classes import hf_config_of

        config_json, config = source.task_config, hf_config_of(source.task_config)
    else:
        config_json, config = source.base.config, AutoConfig.from_pretrained(str(source.base.path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights come dequantized through the hooks
    with quiet_libraries(), init_empty_weights(include_buffers=False):
        model = build_model(config_json, config, dtype=torch.float32)
    return model.eval()


def parameter_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def release() -> None:
        trim(0)

    return release


def _after_layer(module, args, output) -> None:
    """A forward hook: give the freed memory back; returns None so the layer's output stays as it is."""
    _malloc_trim()()


def attach(model, weights: Mapping) -> None:
    """Offload hooks on every module, and a malloc_trim after each decoder layer: the freed weights of a
    layer otherwise stay in glibc's heap, fragmented (1.1B check: peak 1.6-1.8 GiB without, 0.95 GiB with,
    the same time)."""
    from accelerate.hooks import attach_align_device_hook

    layers = decoder_layers(model)
    for layer in layers if layers is not None else []:
        layer.register_forward_hook(_after_layer)

    attach_align_device_hook(
        model, execution_device="cpu", offload=True, weights_map=weights, preload_module_classes=WHOLE
    )
    _report_execution_device(model)
    _embedding_on_cpu(model)


def _placeholder(module, *_) -> None:
    """The module's offloaded (meta) weight as a CPU tensor of its shape that holds one value (stride 0)."""
    w = module.weight
    if w.is_meta:
        module._parameters["weight"] = torch.nn.Parameter(
            torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=False
        )


def _embedding_on_cpu(model) -> None:
    """Models that send the token ids to `embed_tokens.weight.device` (Llama 4) would send them to the meta
    device: between its forwards, the offloaded embedding's weight is a one-value CPU placeholder (its
    hook still brings the real rows for each forward)."""
    emb = model.get_input_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        _placeholder(emb)
        emb.register_forward_hook(_placeholder)


_ON_CPU: dict[type, type] = {}


def _report_execution_device(model) -> None:
    """Models whose forward moves tensors to `self.device` (Idefics3's embeddings, Llama 4) would move them
    to the meta device, where an offloaded model's parameters live: each transformers model in the tree
    reports the CPU, where the hooks run it. The subclass keeps the class's module and name: transformers
    looks a model's recordable outputs up by them (the hidden states LLaVA takes its image features from)."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            cls = type(m)
            if cls not in _ON_CPU:
                names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
                _ON_CPU[cls] = type(
                    cls.__name__, (cls,), {**names, "device": property(lambda self: torch.device("cpu"))}
                )
            m.__class__ = _ON_CPU[cls]


def streamed_model(source: Source):
    """A merged model or NF4 export (a Source without adapter), run one module's weights at a time."""
    model = empty_model(source)
    attach(model, LazyWeights(base_weights(source), parameter_names(model)))
    return model


def streamed_merge(source: Source, dtype: torch.dtype = torch.bfloat16):
    """The model `qmerge merge --dtype` would write from `source`, without writing it: each module's merged
    weights made (qmerge's merge, cast to `dtype` as the files would hold them) when its hook asks."""
    from .steps import decide

    model = empty_model(source)
    config = source.base.config
    saved_as, tied = source.base.stored_as(), tied_weights(config)
    by_weight = {m.weight: m for m in source.layout.lora.values()}
    by_bias = {m.module + ".bias": m for m in source.layout.lora.values() if m.lora_B_bias}

    def weight(name: str) -> torch.Tensor:
        key = saved_as.get(name, name)
        if key not in source.tensors:  # tied: the tensor it is tied to, under its stored name
            to = tied.get(key, tied.get(name, key))
            key = saved_as.get(to, to)
        step = decide(source, key, by_weight.get(key), by_bias.get(key), dtype, False)
        value = step.run(source, dtype)
        return value.to(dtype).float() if value.is_floating_point() else value

    attach(model, LazyWeights(_with_fused(config, weight), parameter_names(model)))
    return model


def _with_fused(config: dict, weight: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`weight`, and for a model tensor transformers builds from several stored ones (MoE experts fused
    into one 3-D parameter), that tensor built from its pieces as transformers builds it."""
    fused = fused_at_load(config)

    def get(name: str) -> torch.Tensor:
        return fuse(config, name, get) if name in fused else weight(name)

    return get


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder's stack of layers (the longest ModuleList), for progress."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else None
