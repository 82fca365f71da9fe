"""The README's CI block, run as a user would, twice in the same workspace: the second run replaces the first
run's outputs (--force) instead of stopping at them."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from tests.test_hostile import run

README = Path(__file__).resolve().parent.parent / "README.md"


def ci_block() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"A CI gate after a training job.*?```bash\n(.*?)```", text, re.S)[1]
    return [shlex.split(cmd) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


def test_the_readme_ci_block_runs_twice(tmp_path, fixtures, base16, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(fixtures / "adapter-qlora", runs / "checkpoint-1000")
    shutil.copytree(base16, tmp_path / "base-model")
    record = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}
    (tmp_path / "heldout.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.chdir(tmp_path)
    commands = ci_block()
    assert [c[:2] for c in commands] == [["qmerge", "merge"], ["qmerge", "export"], ["qmerge", "check"]]
    for attempt in (1, 2):
        for cmd in commands:
            r = run(cmd[1:])
            assert r.exit_code in ((0, 3) if cmd[1] == "check" else (0,)), (attempt, cmd, r.output)
    assert (tmp_path / "merged").is_dir() and (tmp_path / "model-q8_0.gguf").is_file()
    assert (tmp_path / "check.html").read_text().startswith("<!-- qmerge check report -->")
