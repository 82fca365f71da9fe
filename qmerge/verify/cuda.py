"""`qmerge check --device cuda`: both models on the GPU, the reference as training ran it (bitsandbytes'
4-bit kernels in the training's compute dtype, PEFT's LoRA unmerged), or in fp32 with --fp32-reference.

Whole models are loaded (a 4-bit 7B base takes about 4 GB of GPU memory, its bf16 merge 13.5 GB); the CPU
route streams instead (streamed.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DependencyError
from ..io.files import read_json
from ..io.records import TRAINING_RECORD
from ..pipeline.model import model_class_of, quiet_libraries
from ..pipeline.source import Source
from .reference import bnb_config


def cuda_available() -> bool:
    return torch.cuda.is_available()


def require_cuda() -> None:
    if not cuda_available():
        raise DependencyError(
            "--device cuda needs a CUDA GPU and a CUDA build of torch; none is available here."
        )


def compute_dtype(source: Source) -> torch.dtype:
    """The compute dtype training used: the training record's, else bf16 (qmerge train's default on CUDA)."""
    from .. import dtypes

    record = source.adapter.path / TRAINING_RECORD if source.adapter else None
    name = (
        (read_json(record).get("config") or {}).get("compute_dtype") if record and record.is_file() else None
    )
    return dtypes.option_dtype(name) if name in dtypes.OPTIONS else torch.bfloat16


def cuda_reference(source: Source, fp32: bool = False):
    """The unmerged QLoRA model on the GPU."""
    from peft import PeftModel

    compute = torch.float32 if fp32 else compute_dtype(source)
    kwargs = {"device_map": {"": 0}}
    if source.merge_base == "original":
        kwargs["dtype"] = compute
    elif not source.base.is_4bit:
        kwargs.update(
            quantization_config=bnb_config(source.quant, compute), dtype=source.quant.dtype or "auto"
        )
    cls = model_class_of(source.base.path)
    if source.task_config is not None:  # a SEQ_CLS adapter: the classifier it was trained as
        from transformers import AutoModelForSequenceClassification as cls

        kwargs["num_labels"] = len(source.task_config["id2label"])
    with quiet_libraries():
        model = cls.from_pretrained(str(source.base.path), **kwargs)
        if fp32 and source.merge_base != "original":
            model = model.dequantize().float()
        model = PeftModel.from_pretrained(model, str(source.adapter.path)).eval()
    return model


def cuda_base(source: Source, fp32: bool = False):
    """The base model (no adapter) on the GPU, as training loaded it."""
    compute = torch.float32 if fp32 else compute_dtype(source)
    kwargs = {"device_map": {"": 0}}
    if not source.base.is_4bit:
        kwargs.update(
            quantization_config=bnb_config(source.quant, compute), dtype=source.quant.dtype or "auto"
        )
    with quiet_libraries():
        model = model_class_of(source.base.path).from_pretrained(str(source.base.path), **kwargs)
    return (model.dequantize().float() if fp32 else model).eval()


def cuda_candidate(path: Path, kind: str, fp32: bool = False):
    """A merged directory or NF4 export on the GPU (in fp32 with fp32, else as stored / in 4-bit)."""
    with quiet_libraries():
        if kind == "nf4":
            model = model_class_of(path).from_pretrained(str(path), device_map={"": 0})
            model = model.dequantize().float() if fp32 else model
        else:
            model = model_class_of(path).from_pretrained(
                str(path), device_map={"": 0}, dtype=torch.float32 if fp32 else "auto"
            )
    return model.eval()


def cuda_logits(model, tokens: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
    """The logits on the GPU; a record's image inputs moved there, pixel values in the model's dtype."""
    from .generate import on_device
    from .streamed import forward_logits

    return forward_logits(model, tokens.to("cuda"), on_device(inputs or {}, model)).float().cpu()
