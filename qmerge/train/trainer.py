"""QLoRA training on transformers + PEFT + accelerate: NF4 base with double quant, all-linear LoRA.

One process, or several launched by torchrun / `accelerate launch` (data-parallel, or FSDP-QLoRA with a
float quant storage; docs/training.md). Only the main process writes checkpoints, records and the final
adapter, and prints. Checkpoints are PEFT adapters plus qmerge_training.json, the record of the base and of
how it was quantized, which `qmerge merge/check/export` read to reproduce the weights training saw.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import dtypes
from ..errors import InputError
from ..io.files import read_json
from ..io.records import TRAINING_RECORD, training_record, write_json
from .config import QUANT_STORAGE, TrainConfig, config_to_json
from .data import JsonlDataset, pad_collate


def _device_setup(cfg: TrainConfig) -> tuple[torch.dtype, str, object, bool]:
    """(compute dtype, optimizer, device_map, on_cuda)."""
    cuda = torch.cuda.is_available()
    default = torch.bfloat16 if cuda else torch.float32
    compute = dtypes.option_dtype(cfg.compute_dtype) if cfg.compute_dtype else default
    optim = cfg.optim or ("paged_adamw_32bit" if cuda else "adamw_torch")
    if cuda:
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    else:
        device_map = "cpu"
    return compute, optim, device_map, cuda


def sharded() -> bool:
    """True under `accelerate launch` with an FSDP or DeepSpeed config (accelerate tells the processes by
    environment): the model is sharded across processes, not replicated."""
    flags = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    return any(os.environ.get(f, "false").lower() in ("1", "true") for f in flags)


def disable_cpu_repack(model) -> int:
    """Stop bitsandbytes from repacking Linear4bit weights in place during CPU evaluation.

    On CPUs with AVX512-BF16, Linear4bit.forward in eval mode converts its weight to a CPU layout
    (absmax in bf16, double quant dropped); training would then continue on different weights than the
    NF4 ones qmerge reproduces. Returns how many layers were switched.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_qlora_model(cfg: TrainConfig, compute: torch.dtype, device_map):
    """The base in 4-bit NF4 (double quant) with LoRA on all linear layers, ready for k-bit training.

    Sharded (FSDP, DeepSpeed ZeRO-3): the quantized weights are stored in a float dtype (FSDP flattens only
    float tensors), the other weights and the LoRA parameters are kept in that same dtype (one dtype per
    flat parameter), no device_map (the engine places the shards), and prepare_model_for_kbit_training,
    which upcasts to fp32, is left out, as the PEFT and transformers FSDP-QLoRA recipes do.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    storage = QUANT_STORAGE[cfg.quant_storage]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )
    shard = sharded()
    model = AutoModelForCausalLM.from_pretrained(
        str(cfg.base),
        quantization_config=bnb,
        device_map=None if shard else device_map,
        dtype=storage if storage.is_floating_point else "auto",
    )
    disable_cpu_repack(model)
    if shard:
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model = get_peft_model(model, _lora_config(cfg))
    if shard and storage.is_floating_point:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(storage)
    model.peft_config["default"].base_model_name_or_path = str(Path(cfg.base).resolve())
    return model


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    target = cfg.target_modules
    targets = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_record(cfg: TrainConfig, base_dtype: str | None) -> dict:
    """How training quantized the base: what merge/check need to reproduce the weights training saw."""
    return {
        "quant_type": cfg.quant_type,
        "blocksize": 64,
        "double_quant": cfg.double_quant,
        "dtype": base_dtype,
        "quant_storage": cfg.quant_storage,
    }


def _record_callback(record: dict):
    """A callback that writes qmerge_training.json into every checkpoint-N the main process saves."""
    from transformers import TrainerCallback

    class SaveRecord(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                write_json(ckpt / TRAINING_RECORD, record)

    return SaveRecord()


def _arguments(cfg: TrainConfig, optim: str, compute: torch.dtype, cuda: bool, quiet: bool, evaluate: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.output),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        optim=optim,
        bf16=cuda and compute == torch.bfloat16,
        fp16=cuda and compute == torch.float16,
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,  # every rank shuffles the same way; the sampler gives each its share
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        disable_tqdm=quiet,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # every LoRA parameter takes part in every step: no unused-parameter scan (DDP warns about its cost)
        ddp_find_unused_parameters=False,
    )


def _check_inputs(cfg: TrainConfig) -> None:
    for p, what in ((cfg.base, "base model directory"), (cfg.data, "training data")):
        if not Path(p).exists():
            raise InputError(f"{p}: the {what} does not exist.")
    if not (Path(cfg.base) / "config.json").exists():
        raise InputError(f"{cfg.base}: no config.json; --base must be a Hugging Face model directory.")


def train(cfg: TrainConfig, log: Callable[..., None] | None = print) -> dict:
    """Fine-tune cfg.base on cfg.data with QLoRA; the main process saves checkpoints and the final adapter
    to cfg.output. Returns the run's figures (the same on every process) with its rank."""
    from transformers import AutoTokenizer, Trainer
    from transformers.utils import logging as hf_logging

    _check_inputs(cfg)
    hf_logging.set_verbosity_error()
    # transformers 5 renames gradient_checkpointing to activation_checkpointing; the old names still work
    # and are the only ones transformers 4 knows.
    warnings.filterwarnings(
        "ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning
    )
    compute, optim, device_map, cuda = _device_setup(cfg)
    main = int(os.environ.get("RANK", "0")) == 0
    log = log if main else None
    if not cuda and log:
        log(
            f"no CUDA device: training on CPU in {str(compute).replace('torch.', '')} with {optim} "
            "(paged optimizers need CUDA)."
        )
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.base))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = JsonlDataset(cfg.data, tokenizer, cfg.max_seq_length)
    eval_ds = JsonlDataset(cfg.eval_data, tokenizer, cfg.max_seq_length) if cfg.eval_data else None
    model = load_qlora_model(cfg, compute, device_map)
    base_cfg = read_json(Path(cfg.base) / "config.json")
    quant = quantization_record(cfg, base_cfg.get("dtype") or base_cfg.get("torch_dtype"))
    record = training_record(cfg.base, quant, config_to_json(cfg))
    trainer = Trainer(
        model=model,
        args=_arguments(cfg, optim, compute, cuda, log is None, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=pad_collate(tokenizer.pad_token_id),
        callbacks=[_record_callback(record)],
    )
    if log is None:  # --json, or not the main process: keep stdout for the one JSON object
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return _run(trainer, cfg, tokenizer, record, optim, compute, eval_ds is not None)


def _run(trainer, cfg: TrainConfig, tokenizer, record: dict, optim: str, compute, evaluate: bool) -> dict:
    start = time.perf_counter()
    resume = True if cfg.resume_from_checkpoint == "latest" else cfg.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=resume)
    eval_loss = trainer.evaluate()["eval_loss"] if evaluate else None
    out = Path(cfg.output)
    if sharded():
        trainer.save_model(str(out))  # collective: gathers the adapter's shards; the main process writes
    elif trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(out))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        write_json(out / TRAINING_RECORD, record)
    trainer.accelerator.wait_for_everyone()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "output": str(out),
        "train_loss": float(result.training_loss),
        "eval_loss": float(eval_loss) if eval_loss is not None else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": int(trainer.state.global_step),
        "seconds": round(time.perf_counter() - start, 2),
        "optimizer": optim,
        "compute_dtype": str(compute).replace("torch.", ""),
        "processes": trainer.args.world_size,
        "rank": trainer.args.process_index,
        "losses": losses,
    }


def remove_checkpoints(output: Path) -> None:
    """Delete trainer checkpoint-N folders (keeps the final adapter)."""
    for p in Path(output).glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
