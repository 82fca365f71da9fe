"""The architecture stays visible: lower layers never import higher ones (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qmerge"
# package -> modules it must not import (qmerge-relative names, or third-party heavyweights)
FORBIDDEN = {
    "quant": {
        "io",
        "lora",
        "plan",
        "merge",
        "verify",
        "export",
        "train",
        "cli",
        "transformers",
        "peft",
        "bitsandbytes",
        "safetensors",
    },
    "lora": {
        "io",
        "quant",
        "plan",
        "merge",
        "verify",
        "export",
        "train",
        "cli",
        "transformers",
        "peft",
        "bitsandbytes",
    },
    "io": {"plan", "merge", "verify", "export", "train", "cli"},
}


def _imports(path: Path) -> set[str]:
    """Top-level names a module imports: the qmerge layer (io, quant, ...) or the third-party package."""
    pkg = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])  # e.g. ["qmerge", "io"]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg[: len(pkg) - node.level + 1] + (node.module or "").split(".")
            else:
                parts = (node.module or "").split(".")
            parts = [p for p in parts if p]
            names.add(parts[1] if parts[0] == "qmerge" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                names.add(parts[1] if parts[0] == "qmerge" and len(parts) > 1 else parts[0])
    return names


def test_layering():
    for pkg, banned in FORBIDDEN.items():
        for f in (PKG / pkg).glob("*.py"):
            bad = _imports(f) & banned
            assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}"


def test_only_cli_and_demo_import_train():
    for f in PKG.rglob("*.py"):
        if f.parent.name == "train" or f.name in ("cli.py", "demo.py"):
            continue
        assert "train" not in _imports(f), f
