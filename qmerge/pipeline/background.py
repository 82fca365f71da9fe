"""config.json against the tensors in a child process (`python -m qmerge.pipeline.background DIR`): the
check needs transformers, whose import costs seconds that a merge from a 4-bit base otherwise never pays;
in a child it runs on the other core while the merge starts (fit.check_fit, fit.confirm)."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
from pathlib import Path

from ..children import child_env, die_with_parent
from ..io.adapter import Adapter
from ..io.hf_dir import ModelDir
from .fit import Problem, base_problems, target_problems
from .source import Source


class BackgroundCheck:
    """base_problems of a model directory, computed in a child process."""

    def __init__(self, base: ModelDir, adapter: Adapter | None = None):
        self.path = base.path
        cmd = [sys.executable, "-m", "qmerge.pipeline.background", str(base.path)]
        if adapter is not None:
            cmd += ["--adapter", str(adapter.path)]
        if base.store.files and base.store.files[0].suffix != ".safetensors":
            cmd.append("--allow-pickle")
        self._proc = subprocess.Popen(
            cmd, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        atexit.register(self._proc.kill)  # an interrupted run does not leave it behind

    def done(self) -> bool:
        return self._proc.poll() is not None

    def problems(self) -> list[Problem]:
        out, err = self._proc.communicate()
        try:
            return [Problem(**p) for p in json.loads(out)]
        except (ValueError, TypeError):
            last = (err.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            return [
                Problem(
                    "error", f"{self.path}: checking config.json against the tensors failed ({last}).", "base"
                )
            ]


def _main(argv: list[str]) -> None:
    """The child of BackgroundCheck: print base_problems of the model directory argv[0] as JSON."""
    from ..errors import QmergeError
    from .base import QuantSettings

    pickle = "--allow-pickle" in argv
    try:
        base = ModelDir(Path(argv[0]), allow_pickle=pickle)
        source = Source(base, None, QuantSettings(), "dequantized" if base.is_4bit else "original")
        found = [{**p.__dict__, "subject": "base"} for p in base_problems(source)]
    except QmergeError as e:
        found = [{"severity": "error", "message": str(e), "subject": "base"}]
    if "--adapter" in argv:
        try:
            adapter = Adapter(Path(argv[argv.index("--adapter") + 1]), pickle)
            found += [p.__dict__ for p in target_problems(adapter)]
        except QmergeError as e:
            found.append({"severity": "error", "message": str(e), "subject": "adapter"})
    print(json.dumps(found))


if __name__ == "__main__":
    die_with_parent()
    _main(sys.argv[1:])
