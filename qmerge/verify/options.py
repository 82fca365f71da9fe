"""What a check runs on and measures: the CLI's options, validated as the CLI validates them, for callers of
the Python API too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError
from ..names import MERGE_BASES
from .metrics import Thresholds

DEVICES = ("auto", "cpu", "cuda")
PROBE_MODES = ("warn", "fail")  # the probe's verdict "differs": a warning, or a failed check (exit 3)


@dataclass(frozen=True)
class Options:
    """What a check runs on and measures (the CLI's options)."""

    text: str | None = None
    seq_len: int = 128
    max_seqs: int = 8
    data: Path | None = None
    generate: int = 0
    max_new_tokens: int = 64
    against_base: bool = False
    naive: bool = False
    device: str = "auto"
    fp32_reference: bool = False
    lora: Path | None = None  # a llama.cpp LoRA GGUF on a GGUF candidate
    allow_other_base: bool = False  # check against a base that is another model than the adapter names
    probe_quant: str | None = None  # "warn" or "fail": run the quantization probe on data (probe.py)

    def __post_init__(self):
        """The CLI's ranges and rules, for callers of the Python API (messages name the keywords)."""
        for name, lo, hi in (
            ("seq_len", 2, 8192),
            ("max_seqs", 1, 1024),
            ("generate", 0, 10000),
            ("max_new_tokens", 1, 4096),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise OptionError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
        if self.device not in DEVICES:
            raise OptionError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.generate and self.data is None:
            raise OptionError("generate needs data (the prompts come from it).")
        if self.probe_quant not in (None, *PROBE_MODES):
            raise OptionError(
                f"probe_quant must be one of {', '.join(PROBE_MODES)}, got {self.probe_quant!r}."
            )
        if self.probe_quant and self.data is None:
            raise OptionError("probe_quant needs data (the adapter's loss is measured on its records).")

    def with_values(self, values: dict, thresholds: Thresholds, merge_base: str) -> Options:
        """These options with `values` (keywords of check()) put in, refused when one is not an option or
        does not go with the thresholds and merge base of the same check."""
        unknown = set(values) - set(Options.__dataclass_fields__)
        if unknown:
            raise OptionError(
                f"check() takes no option {', '.join(sorted(unknown))}; the options are "
                f"{', '.join(Options.__dataclass_fields__)}."
            )
        opts = Options(**{**self.__dict__, **values})
        if thresholds.min_task_agreement is not None and not opts.generate:
            raise OptionError("min_task_agreement needs generate=N (and data).")
        if merge_base not in MERGE_BASES:
            raise OptionError(f"merge_base must be one of {', '.join(MERGE_BASES)}, got {merge_base!r}.")
        return opts
