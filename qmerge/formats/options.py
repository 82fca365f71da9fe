"""The export formats in one table (name, what it writes, the options it takes) that the command line's
choices, the API's checks and the option-conflict rules all read; and the option types they take. Torch-free,
so that usage errors answer at once."""

from __future__ import annotations

from dataclasses import dataclass

from ..names import DTYPES, GGUF_LLAMA_CPP_TYPES, GGUF_OWN_CALIBRATED_TYPES

DEFAULT_MAX_SHARD = 5 * 1000**3  # bytes per safetensors shard (transformers' default)


@dataclass(frozen=True)
class NF4Options:
    """How to requantize: blocksize, double quant, and the dtype the layers compute (and store scales) in."""

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bf16"
    quant_type: str = "nf4"


@dataclass(frozen=True)
class TensorTypes:
    """Types llama.cpp's quantizer gives the token embedding and the output layer instead of its own rule's
    (None: its rule's)."""

    token_embedding: str | None = None
    output: str | None = None

    def __bool__(self) -> bool:
        return bool(self.token_embedding or self.output)


@dataclass(frozen=True)
class Format:
    """One export format: what it writes and the export options it takes (beyond source, base, output)."""

    name: str
    writes: str
    takes: frozenset[str]


_PLAIN = frozenset({"max_shard_size"})
FORMATS: dict[str, Format] = {
    **{d: Format(d, f"a Hugging Face model directory in {d}", _PLAIN) for d in DTYPES},
    "nf4": Format(
        "nf4",
        "a bitsandbytes 4-bit model directory transformers loads",
        frozenset({"max_shard_size", "nf4", "calibrate", "calibration_tokens"}),
    ),
    "gguf": Format(
        "gguf",
        "a GGUF file llama.cpp loads",
        frozenset({"gguf_type", "calibrate", "calibration_tokens", "imatrix", "tensor_types", "keep_delta"}),
    ),
    "gguf-lora": Format(
        "gguf-lora",
        "a directory: the adapter as a llama.cpp LoRA GGUF, its base as a GGUF, an Ollama Modelfile",
        frozenset({"gguf_type", "calibrate", "calibration_tokens", "tensor_types"}),
    ),
}
EXPORT_FORMATS = tuple(FORMATS)
CALIBRATED_TYPES = GGUF_LLAMA_CPP_TYPES  # the GGUF types --calibrate applies to

# How messages name the options: as the command line spells them, or as the API's keywords.
CLI_NAMES = {
    "to": "--to",
    "gguf_type": "--gguf-type",
    "calibrate": "--calibrate",
    "imatrix": "--imatrix",
    "tensor_types": "--gguf-embedding-type / --gguf-output-type",
    "keep_delta": "--keep-delta",
}
API_NAMES = {k: k for k in CLI_NAMES} | {"tensor_types": "tensor_types"}


def calibrates(to: str, gguf_type: str) -> bool:
    """Whether an export to `to` (with `gguf_type`) can choose its codes on calibration data."""
    takes = "calibrate" in FORMATS[to].takes if to in FORMATS else False
    return takes and (to == "nf4" or gguf_type.lower() in CALIBRATED_TYPES)


def takes_tensor_types(to: str, gguf_type: str, calibrated: bool) -> bool:
    """Whether llama.cpp's quantizer writes the GGUF of this export (so TensorTypes apply)."""
    t = gguf_type.lower()
    return (
        to in FORMATS
        and "tensor_types" in FORMATS[to].takes
        and t in GGUF_LLAMA_CPP_TYPES
        and not (calibrated and t in GGUF_OWN_CALIBRATED_TYPES)
    )


def option_conflict(
    to: str,
    gguf_type: str,
    calibrate=None,
    imatrix=None,
    tensor_types: TensorTypes | None = None,
    keep_delta: float | None = None,
    names: dict[str, str] = API_NAMES,
) -> str | None:
    """What is wrong with this combination of export options, named as `names` spells them (CLI_NAMES for the
    command line's usage error, API_NAMES for the API's UnsupportedError), or None."""
    n = names
    to_gguf = f"{n['to']} gguf"
    if to not in FORMATS:
        return f"unknown export format {to!r}: choose one of {', '.join(EXPORT_FORMATS)}."
    if calibrate is not None and not calibrates(to, gguf_type):
        return (
            f"{n['calibrate']} applies to {n['to']} nf4, and to {to_gguf} / gguf-lora with {n['gguf_type']} "
            f"{', '.join(CALIBRATED_TYPES)}."
        )
    if tensor_types and not takes_tensor_types(to, gguf_type, calibrate is not None):
        return (
            f"{n['tensor_types']} apply where llama.cpp's quantizer writes the file: {to_gguf} or gguf-lora with "
            f"a {n['gguf_type']} llama.cpp quantizes (not f32, f16, bf16, q8_0; nor "
            f"{', '.join(GGUF_OWN_CALIBRATED_TYPES)} with {n['calibrate']}, which qmerge writes itself)."
        )
    calibrated_gguf = to == "gguf" and calibrate is not None
    if keep_delta is not None and not calibrated_gguf:
        return (
            f"{n['keep_delta']} applies to a calibrated GGUF of an adapter: {to_gguf} {n['calibrate']} DATA."
        )
    if imatrix is not None and not calibrated_gguf:
        return (
            f"{n['imatrix']} writes the importance matrix of a calibrated GGUF export: use it with {to_gguf} "
            f"and {n['calibrate']}."
        )
    return None
