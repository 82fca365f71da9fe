"""The unmerged QLoRA model as transformers, bitsandbytes and PEFT run it (never qmerge's merge code).

The base is loaded with a BitsAndBytesConfig (quantized by bitsandbytes itself, or read from a 4-bit
checkpoint), its Linear4bit layers are dequantized by bitsandbytes (transformers' model.dequantize(), before
any forward, which sidesteps the CPU repacking gotcha), the model is cast to fp32, and PEFT runs the
adapter unmerged on top. Merge error is then not hidden under bf16 compute noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnsupportedError
from ..io.adapter import Adapter
from ..io.hf_dir import ModelDir
from ..pipeline.base import QuantSettings
from ..pipeline.model import model_class_of, quiet_libraries
from ..pipeline.source import quant_settings_for, resolve_base_path


def model_logits(model, tokens: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
    """fp32 logits [n, seq, vocab] of a transformers model for token ids [n, seq], one sequence at a time
    (`inputs`: a one-sequence part's images)."""
    with torch.no_grad():
        return torch.cat(
            [model(input_ids=tokens[i : i + 1], **(inputs or {})).logits.float() for i in range(len(tokens))]
        )


def bnb_config(q: QuantSettings, compute=torch.float32):
    from transformers import BitsAndBytesConfig

    if q.blocksize != 64:
        raise UnsupportedError(
            "transformers always quantizes with blocksize 64; a base trained otherwise cannot be reproduced."
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=q.storage,
    )


def load_4bit_base(base: ModelDir, quant: QuantSettings):
    """The base as transformers loads it for QLoRA: 4-bit Linear layers quantized by bitsandbytes."""
    with quiet_libraries():
        if base.is_4bit:
            return model_class_of(base.path).from_pretrained(str(base.path), device_map="cpu")
        return model_class_of(base.path).from_pretrained(
            str(base.path),
            quantization_config=bnb_config(quant),
            dtype=quant.dtype or "auto",
            device_map="cpu",
        )


def reference_model(
    adapter_path: Path,
    base_path: Path | None,
    quant: QuantSettings | None = None,
    merge_base: str = "dequantized",
):
    """(the unmerged QLoRA model in fp32, its Adapter, its base ModelDir)."""
    from peft import PeftModel

    adapter = Adapter(adapter_path)
    base = ModelDir(resolve_base_path(adapter, base_path))
    q = quant_settings_for(adapter, quant, base)
    with quiet_libraries():
        if merge_base == "original":
            model = model_class_of(base.path).from_pretrained(str(base.path), dtype=torch.float32)
        else:
            model = load_4bit_base(base, q)
            model = model.dequantize()  # bitsandbytes' dequantize_4bit, in the quant_state dtype
            model = model.float()
        model = PeftModel.from_pretrained(model, str(adapter.path))
        model.eval()
    return model, adapter, base


def naive_merged_model(adapter: Adapter, base: ModelDir, quant: QuantSettings):
    """What users get from PEFT's merge_and_unload on the 4-bit model (the delta requantized to NF4)."""
    from peft import PeftModel

    with quiet_libraries():
        model = load_4bit_base(base, quant)
        model = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
        model = model.dequantize().float()
        model.eval()
    return model
