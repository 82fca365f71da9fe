"""Tiny real models and tokenizers, built deterministically on the machine (no hub, no network).

Used by the demo, the fixtures script and the tests. Dimensions are multiples of 32 so that every
linear layer also runs through bitsandbytes' CPU kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CORPUS = """
The quick brown fox jumps over the lazy dog. A merge keeps what the fine-tune learned.
Quantization rounds each weight to one of sixteen levels; the adapter adds a small correction.
Question: what is the capital of France? Answer: Paris. Question: what colour is the sky? Answer: blue.
User: hello there. Assistant: hello, how can I help you today?
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau
red orange yellow green blue indigo violet black white grey brown pink purple cyan magenta
cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer rabbit mouse snake frog
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - = * / ( ) [ ] { } < > : ; , . ! ?
""".strip()

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model."""

    arch: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3 | phi3 | granite | smollm3 | olmo2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 320
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    seed: int = 0
    init_std: float = 0.02


def build_tokenizer(out_dir: Path, vocab_size: int = 320, corpus: str = CORPUS, extra_special: tuple = ()):
    """Train a byte-level BPE tokenizer on `corpus` and save it as a transformers fast tokenizer (with
    `extra_special` tokens beside the demo's own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_sentencepiece(path: Path, vocab_size: int = 200, corpus: str = CORPUS) -> Path:
    """Train a SentencePiece (BPE) tokenizer.model on `corpus` and write it to `path`."""
    import tempfile

    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text(corpus, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(Path(tmp) / "sp"),
            vocab_size=vocab_size,
            model_type="bpe",
            hard_vocab_limit=False,
            minloglevel=2,
        )
        Path(path).write_bytes((Path(tmp) / "sp.model").read_bytes())
    return Path(path)


def model_config(spec: TinySpec, vocab_size: int):
    """A transformers config for `spec` with the tokenizer's vocabulary size."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        SmolLM3Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        rms_norm_eps=1e-5,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    if spec.arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    head_dim = spec.hidden_size // spec.num_attention_heads
    if spec.arch == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim, use_sliding_window=False)
    if spec.arch == "gemma":
        return GemmaConfig(**common, head_dim=head_dim)
    if spec.arch == "gemma2":
        return Gemma2Config(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    if spec.arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    if spec.arch == "phi3":
        return Phi3Config(**common, original_max_position_embeddings=spec.max_position_embeddings)
    if spec.arch == "granite":  # multipliers away from 1, so that a scale written wrong shows
        return GraniteConfig(
            **common,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            attention_multiplier=0.3 / head_dim**0.5,
            logits_scaling=2.0,
        )
    if spec.arch == "olmo2":
        return Olmo2Config(**common)
    if spec.arch == "smollm3":
        return SmolLM3Config(**common, use_sliding_window=False)
    raise ValueError(
        f"unknown tiny architecture {spec.arch!r}: expected llama, mistral, qwen2, qwen3, gemma, gemma2, "
        "gemma3, phi3, granite, smollm3 or olmo2"
    )


def away_from_identity(model) -> None:
    """Norm weights away from 1 and non-zero biases (in place), so that a wrong mapping of either shows in
    the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))


def build_base(out_dir: Path, spec: TinySpec = TinySpec(), dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a deterministic tiny causal LM (weights, config, tokenizer) to out_dir in `dtype`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir, spec.vocab_size)
    config = model_config(spec, len(tok))
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    away_from_identity(model)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=3, max_new_tokens=16
    )
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").write_text(
        f"Tiny {spec.arch} model made by qmerge.demo.tiny.build_base: {json.dumps(spec.__dict__)}\n",
        encoding="utf-8",
    )
    return out_dir
