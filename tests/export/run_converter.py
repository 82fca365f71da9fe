"""Run llama.cpp's convert_hf_to_gguf.py, the reference for GGUF metadata and tensors, on several model
directories in one process (torch is imported once), with the vocabulary left out: the converter knows real
models' tokenizers only (a BPE pre-tokenizer is recognised by a hash of how it splits a fixed text), and
other tests check the vocabulary qmerge writes by llama.cpp tokenizing and running the files.

Usage: python run_converter.py CONVERTER [MODEL_DIR OUTTYPE[:FLAG] OUT.gguf] ...  (FLAG: mmproj, no-mtp)
Prints one line per conversion that failed and exits 1 if any did.
"""

from __future__ import annotations

import runpy
import sys
import traceback
from pathlib import Path


def main() -> int:
    script, jobs = Path(sys.argv[1]).resolve(), sys.argv[2:]
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]  # as the script itself does
    import conversion

    conversion.load_all_models()
    for cls in _subclasses(conversion.ModelBase):
        if "set_vocab" in cls.__dict__:
            cls.set_vocab = lambda self: None
    failed = 0
    for model, outtype, out in zip(jobs[0::3], jobs[1::3], jobs[2::3], strict=True):
        outtype, _, flag = outtype.partition(":")  # TYPE:mmproj (the vision projector), TYPE:no-mtp
        sys.argv = [str(script), model, "--outtype", outtype, "--outfile", out] + (
            [f"--{flag}"] if flag else []
        )
        try:
            runpy.run_path(str(script), run_name="__main__")
        except BaseException:  # noqa: BLE001 - reported per model, the others still run
            failed += 1
            print(f"FAILED {model} {outtype}: {traceback.format_exc(limit=-3)}", flush=True)
    return 1 if failed else 0


def _subclasses(cls):
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


if __name__ == "__main__":
    sys.exit(main())
