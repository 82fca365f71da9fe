"""The demo's task: a lookup from code words to answer words that a tiny model cannot do before training,
asked in the chat format `qmerge train` trains on (and `qmerge check --data --generate` scores)."""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYS = [
    "fox",
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "cow",
    "sheep",
    "goat",
    "lion",
    "tiger",
    "bear",
    "wolf",
    "deer",
    "rabbit",
    "mouse",
    "snake",
    "frog",
    "red",
    "blue",
    "green",
    "pink",
    "grey",
    "black",
]
VALUES = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "Monday",
    "Tuesday",
    "Friday",
    "Sunday",
    "March",
    "April",
    "June",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "sigma",
]


def task_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """The demo's lookup task: each code word maps to an answer word (a fixed shuffle)."""
    values = VALUES[:]
    random.Random(seed).shuffle(values)
    return list(zip(KEYS, values, strict=True))


def write_task(data_dir: Path) -> Path:
    """The task as chat JSONL for `qmerge train`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"code {k}"}, {"role": "assistant", "content": v}]}
        for k, v in task_pairs()
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
