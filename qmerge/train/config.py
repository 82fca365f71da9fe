"""Training configuration: QLoRA paper defaults, overridable by a YAML/JSON file and by options."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..errors import InputError


@dataclass(frozen=True)
class TrainConfig:
    """Everything `qmerge train` needs. Defaults follow the QLoRA paper (Dettmers et al., 2023)."""

    base: Path
    data: Path
    output: Path
    eval_data: Path | None = None
    # LoRA on all linear layers; r=64, alpha=16, dropout 0.05 (the paper's choice for models up to 13B)
    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    # 4-bit base: NF4 with double quantization, blocksize 64 (fixed by transformers)
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str = "uint8"  # bf16/fp16/fp32 for FSDP-QLoRA (FSDP shards only float tensors)
    compute_dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    # optimisation: constant schedule, lr 2e-4, grad-norm clip 0.3, paged AdamW on CUDA
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_seq_length: int = 512
    gradient_checkpointing: bool = True
    optim: str | None = None  # None: paged_adamw_32bit on CUDA, adamw_torch on CPU
    save_steps: int = 100
    eval_steps: int | None = None
    logging_steps: int = 10
    seed: int = 42
    resume_from_checkpoint: str | None = None


_PATH_FIELDS = {"base", "data", "output", "eval_data"}
# --quant-storage: the dtype bitsandbytes stores packed 4-bit weights in (values unchanged)
QUANT_STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_train_config(config_file: Path | None, overrides: dict) -> TrainConfig:
    """A TrainConfig from an optional YAML/JSON file, with command-line overrides on top."""
    values: dict = {}
    if config_file is not None:
        text = Path(config_file).read_text(encoding="utf-8")
        try:
            if Path(config_file).suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # yaml and json raise their own error types
            raise InputError(f"{config_file}: cannot parse ({e}).") from e
        if not isinstance(values, dict):
            raise InputError(f"{config_file}: expected a mapping of option names to values.")
    values.update(overrides)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown training option(s) {unknown}; known: {sorted(known)}.")
    for required in ("base", "data", "output"):
        if values.get(required) in (None, ""):
            raise InputError(f"training needs '{required}' (an option or a key in --config).")
    for k in _PATH_FIELDS:
        if values.get(k) is not None:
            values[k] = Path(values[k])
    if values.get("quant_storage", "uint8") not in QUANT_STORAGE:
        raise InputError(
            f"quant_storage {values['quant_storage']!r}: choose one of {', '.join(QUANT_STORAGE)}."
        )
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise InputError(f"bad training configuration: {e}") from e


def config_to_json(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
