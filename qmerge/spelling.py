"""Messages name options as the caller spells them: command-line options for the CLI, keyword arguments for
the Python API. The library's messages are written with the command line's options (the CLI is the caller
most users meet); the API's verbs translate them (`keyword_errors`), unless the CLI is the one calling.
Torch-free."""

from __future__ import annotations

import contextvars
import functools
import re

from .errors import QmergeError

# set by the command line for the run: its messages keep the options' spelling
CLI = contextvars.ContextVar("qmerge_cli", default=False)

# options whose API form is not `name=`
_IRREGULAR = {
    "--quant-type fp4 --no-double-quant": 'quant=QuantSettings(quant_type="fp4", double_quant=False)',
    "--quant-*": "quant=QuantSettings(...)",
    "--quant-type": "quant=QuantSettings(quant_type=...)",
    "--quant-blocksize": "quant=QuantSettings(blocksize=...)",
    "--no-double-quant": "quant=QuantSettings(double_quant=False)",
    "--double-quant": "quant=QuantSettings(double_quant=True)",
    "--quant-dtype": "quant=QuantSettings(dtype=...)",
    "--quant-storage": "quant=QuantSettings(storage=...)",
    "--gguf-embedding-type / --gguf-output-type": "tensor_types=TensorTypes(...)",
    "--gguf-embedding-type": "tensor_types=TensorTypes(token_embedding=...)",
    "--gguf-output-type": "tensor_types=TensorTypes(output=...)",
    "--nf4-compute-dtype": "nf4=NF4Options(compute_dtype=...)",
    "--max-shard-size": "max_shard_size=",
    "-o": "out=",
    "--output": "out=",
}
_FLAGS = {"force", "allow_pickle", "allow_other_base", "fp32_reference", "against_base", "naive"}
_CHOICES = {"merge_base", "to", "gguf_type", "dtype", "probe_quant", "device"}
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: (?P<value>[A-Z][A-Z_]*|[a-z][a-z0-9_]*))?")


def _keyword(m: re.Match) -> str:
    name, value = m.group(1)[2:].replace("-", "_"), m.group("value")
    if value and value.isupper() and name not in _FLAGS:  # a placeholder: --base DIR -> base=DIR
        return f"{name}={value}"
    if value and name in _CHOICES and not value.isupper():  # --merge-base original -> merge_base="original"
        return f'{name}="{value}"'
    keyword = f"{name}=True" if name in _FLAGS else f"{name}="
    return keyword + (f" {value}" if value else "")  # the next word is the sentence's, kept


# a command to run, quoted whole ("... instead: qmerge export ADAPTER --to gguf (the merged ...)"), qmerge's or
# llama.cpp's converter's (its own --mmproj): kept as written, up to a bracket, comma, semicolon or backtick,
# or a full stop that ends the sentence (not "...")
_COMMAND = re.compile(
    r"(?:\bqmerge [a-z]+\b|\bconvert_hf_to_gguf\.py )[^(),;`]*?(?=[(),;`]|(?<!\.)\.(?!\.)(?:\s|$)|$)"
)


def as_keywords(message: str) -> str:
    """`message` with the command line's options written as the API's keyword arguments (command lines it
    quotes kept as they are: they are to be run)."""
    pieces, end = [], 0
    for m in _COMMAND.finditer(message):
        pieces += [_translate(message[end : m.start()]), m.group()]
        end = m.end()
    return "".join([*pieces, _translate(message[end:])])


def _translate(text: str) -> str:
    for option in sorted(_IRREGULAR, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(option)}(?![\w-])", _IRREGULAR[option], text)
    return _OPTION.sub(_keyword, text)


def keyword_errors(fn):
    """An API verb whose QmergeError messages name keyword arguments, not options (unless the CLI calls)."""

    @functools.wraps(fn)
    def verb(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QmergeError as e:
            if not CLI.get() and e.args and isinstance(e.args[0], str):
                e.args = (as_keywords(e.args[0]), *e.args[1:])
            raise

    return verb
