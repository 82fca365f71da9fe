"""Ollama Modelfiles: FROM (and ADAPTER) with the TEMPLATE, SYSTEM and stop strings of the model's own chat
template, translated and checked by rendering (chat/translate.py), or a comment that says why not.

The chat template is the one training rendered with (the adapter's tokenizer's when it has one, chosen by
the GGUF writer's own rule), rendered by transformers' apply_chat_template as training renders it; whether
llama.cpp starts each prompt with BOS is asked of llama.cpp, on the GGUF just written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..chat.translate import Translation, translate
from ..errors import InputError
from ..io.atomic import OutputFile, atomic_file, check_output, describe_files
from ..pipeline.model import load_tokenizer

HEADER = "# Ollama Modelfile written by qmerge"


@dataclass(frozen=True)
class Modelfile:
    """What goes in a Modelfile: the GGUF(s) it names and the translated chat template."""

    model: str  # FROM, as written (./name.gguf beside the Modelfile, else an absolute path)
    adapter: str | None
    chat: Translation

    def text(self) -> str:
        c = self.chat
        lines = [f"{HEADER} {__version__}. Create the model: ollama create NAME -f Modelfile"]
        if c.template is not None:
            lines.append(
                f"# Chat template ({c.family}) translated from the model's own; checked by rendering."
            )
        else:
            lines += [
                f"# The model's chat template was not translated: {c.reason}.",
                "# Ollama uses the GGUF's chat template only where it recognizes it; write TEMPLATE yourself.",
            ]
        lines += [f"# Note: {n}." for n in c.notes]
        lines.append(f"FROM {self.model}")
        if self.adapter:
            lines.append(f"ADAPTER {self.adapter}")
        if c.template is not None:
            lines.append(f'TEMPLATE """{c.template}"""')
            if c.system:
                lines.append(f'SYSTEM """{c.system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in c.stop if _quotable(s)]
        return "\n".join(lines) + "\n"


def _quotable(s: str) -> bool:
    return bool(s) and not any(ch in s for ch in '"\\\n')


def model_path(gguf: Path, modelfile: Path) -> str:
    """FROM's path: ./NAME when the GGUF lies beside the Modelfile (Ollama reads it relative to the
    Modelfile), else the GGUF's absolute path."""
    gguf, modelfile = Path(gguf).resolve(), Path(modelfile).resolve()
    return f"./{gguf.name}" if gguf.parent == modelfile.parent else str(gguf)


def chat_translation(tokenizer_dir: Path, gguf: Path) -> Translation:
    """The Ollama side of the model's chat template (the GGUF's), or a Translation saying why there is none."""
    template = _chat_template(tokenizer_dir)
    if template is None:
        return Translation(None, "none", reason="the model has no chat template")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        return Translation(
            None, "none", reason=f"{tokenizer_dir} has no tokenizer_config.json to render it with"
        )

    def jinja(messages: list[dict], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, chat_template=template
        )

    special = sorted(
        {
            *tokenizer.all_special_tokens,
            *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special),
        }
    )
    bos = tokenizer.bos_token or ""
    return translate(jinja, template, special, bos, bool(bos) and _adds_bos(gguf))


def _chat_template(tokenizer_dir: Path) -> str | None:
    """The chat template training rendered with (the adapter's tokenizer's when it has one): what a GGUF
    of that tokenizer carries (io/gguf/vocab.py's rule), the default of a list of named ones."""
    from ..io.gguf.vocab import chat_template_of

    template = chat_template_of(tokenizer_dir)
    if isinstance(template, list):  # named templates: the default one, as transformers picks it
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _adds_bos(gguf: Path) -> bool:
    """Whether llama.cpp starts a prompt with BOS for this GGUF (its vocabulary's own answer)."""
    from .. import llama_cpp

    lib = llama_cpp.require("reading the GGUF's tokenizer for the Modelfile")
    params = lib.llama_model_default_params()
    params.vocab_only = True
    with llama_cpp.quiet_native_stderr():
        model = lib.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        raise InputError(f"{gguf}: llama.cpp cannot read this GGUF's vocabulary.")
    try:
        return bool(lib.llama_vocab_get_add_bos(lib.llama_model_get_vocab(model)))
    finally:
        lib.llama_model_free(model)


def write_modelfile(
    path: Path, gguf: Path, tokenizer_dir: Path, adapter: str | None = None, from_path: str | None = None
) -> Translation:
    """Write the Modelfile at `path` (no atomicity: the caller's) for the GGUF at `gguf`. `from_path`: FROM's
    text when the GGUF is not yet where it will lie (a temporary directory)."""
    chat = chat_translation(tokenizer_dir, gguf)
    text = Modelfile(from_path or model_path(gguf, path), adapter, chat).text()
    Path(path).write_text(text, encoding="utf-8")
    return chat


def not_written_by_qmerge(path: Path) -> str | None:
    """Why `path` is not a Modelfile qmerge wrote (None when it is: --force may replace it)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return "it is not a Modelfile qmerge wrote"
    return None if first.startswith(HEADER) else "it is not a Modelfile qmerge wrote (no qmerge header)"


def check_modelfile_target(path: Path, force: bool, inputs) -> None:
    """Refuse a Modelfile path before a long export rather than after it."""
    check_output(Path(path), force, inputs, not_written_by_qmerge)


def modelfile_beside(
    gguf: Path, path: Path, tokenizer_dir: Path, force: bool, inputs
) -> tuple[OutputFile, dict]:
    """Write the Modelfile for the finished GGUF file `gguf` at `path`, atomically: (its file record, JSON)."""
    with atomic_file(Path(path), force, inputs, not_written_by_qmerge) as tmp:
        chat = write_modelfile(tmp, gguf, tokenizer_dir, None, model_path(gguf, path))
        record = describe_files(tmp)[0]
    return OutputFile(os.fspath(path), record.bytes, record.sha256), {"path": str(path), **chat.to_json()}
