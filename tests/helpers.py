"""Reference computations done directly with transformers, bitsandbytes and PEFT (never qmerge's merge)."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = torch.tensor([[1, 17, 45, 99, 120, 7, 250, 33, 64, 81, 200, 5, 9, 300, 150, 42]])
# A tiny decoder's text settings, shared by the family tests (every linear dimension whole 64-value blocks
# or under one row: bitsandbytes' CPU dequantization is right for those).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=320,
    max_position_embeddings=128,
)


def bnb_config(compute=torch.float32):
    """The QLoRA load config: NF4, double quant (what transformers + bitsandbytes do at load time)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def reference_unmerged(
    adapter: Path,
    base: Path,
    tokens: torch.Tensor = TOKENS,
    original: bool = False,
    model_class=None,
    inputs: dict | None = None,
    **load,
) -> torch.Tensor:
    """fp32 logits of base + adapter unmerged: 4-bit base quantized by bitsandbytes and dequantized by it.
    `model_class`: the auto class training built (default AutoModelForCausalLM); `inputs`: more forward
    inputs (a processor's pixel values); `load`: more from_pretrained arguments (num_labels for a classifier)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    if original:
        model = cls.from_pretrained(str(base), dtype=torch.float32, **load)
    else:
        cfg = bnb_config()
        kw = (
            {}
            if (Path(base) / "config.json").read_text().find("quantization_config") >= 0
            else {"quantization_config": cfg}
        )
        model = cls.from_pretrained(str(base), device_map="cpu", **kw, **load)
        model = model.dequantize().float()
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=tokens, **(inputs or {})).logits.float()


def logits_of(model_dir: Path, tokens: torch.Tensor = TOKENS, model_class=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def kl_top1(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    r = torch.log_softmax(ref.double(), -1)
    c = torch.log_softmax(cand.double(), -1)
    kl = float((r.exp() * (r - c)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == cand.argmax(-1)).double().mean())
    return kl, top1


def random_adapter(base: Path, dst: Path, seed: int = 0, b_scale: float = 0.05, **lora_kwargs) -> Path:
    """A LoRA adapter made by PEFT on `base` with non-zero B (init_lora_weights=False), B scaled by
    `b_scale` (PEFT's random B gives deltas far larger than training does), saved to `dst`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(init_lora_weights=False, **lora_kwargs),
    )
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(b_scale)
    peft.save_pretrained(str(dst))
    return Path(dst)


def inspect_path(path: Path, base: Path | None = None, allow_pickle: bool = False) -> dict:
    """`qmerge inspect --json`'s object, through the library."""
    from qmerge.description import describe

    return describe(path, base, allow_pickle).to_json()
