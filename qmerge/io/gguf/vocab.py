"""The vocabulary in GGUF: BPE (tokenizer.json, with llama.cpp's pre-tokenizer names) and SentencePiece
(tokenizer.model), special tokens and the chat template, as convert_hf_to_gguf.py writes them."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import DependencyError, InputError, UnsupportedError


def _bpe_pre(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, from its pre_tokenizer (a small known table)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp), not "gpt2"
    if "\\\\p{N}{1,3}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "llama-bpe"
    if "\\\\p{N}" in text and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text:
        return "qwen2"
    return "default"


def add_tokenizer(w, model_dir: Path, vocab_size: int) -> str:
    """Write the vocabulary, merges/scores, special tokens and chat template. Returns the tokenizer kind."""
    import gguf

    tj_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    if sp_path.exists():
        kind = _add_sentencepiece(w, sp_path, vocab_size)
    elif tj_path.exists():
        kind = _add_bpe(w, model_dir, tj_path, vocab_size)
    else:
        raise InputError(
            f"{model_dir}: no tokenizer.json or tokenizer.model; llama.cpp needs the vocabulary in the GGUF."
        )
    special = gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=vocab_size)
    special.add_to_gguf(w)
    if special.chat_template is None and (template := chat_template_of(model_dir, special)) is not None:
        w.add_chat_template(template)
    return kind


def chat_template_of(model_dir: Path, special=None) -> str | list | None:
    """The chat template a GGUF of this tokenizer carries: gguf-py's SpecialVocab's (tokenizer_config.json;
    a list of named templates as it is), else chat_template.jinja (transformers 5 saves it apart)."""
    import gguf

    special = special if special is not None else gguf.SpecialVocab(model_dir, load_merges=False)
    if special.chat_template is not None:
        return special.chat_template
    jinja = Path(model_dir) / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.exists() else None


def _add_bpe(w, model_dir: Path, tj_path: Path, vocab_size: int) -> str:
    import gguf
    from transformers import AutoTokenizer

    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UnsupportedError(
            f"{tj_path}: tokenizer model {(tj.get('model') or {}).get('type')} is not supported for GGUF (BPE and SentencePiece are)."
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise InputError(
            f"{tj_path}: the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings."
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_bpe_pre(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    return "gpt2"


def _add_sentencepiece(w, sp_path: Path, vocab_size: int) -> str:
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise DependencyError("exporting a SentencePiece tokenizer needs the sentencepiece package.") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(sp_path))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    return "llama"
