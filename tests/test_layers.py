"""The architecture stays visible: lower layers never import higher ones (STYLE.md).

Floors, bottom up: dtypes/errors; quant/ and lora/ (pure math); io/ (files, knows no merge); pipeline/
(the merge); formats/ and verify/; describe, api, render, cli and demo/ on top. Only cli and demo/ import
train/.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qmerge"
HIGHER_THAN_IO = {
    "pipeline",
    "formats",
    "verify",
    "describe",
    "api",
    "render",
    "reports",
    "cli",
    "demo",
    "train",
    "llama_cpp",
}
# package or module -> qmerge floors and third-party packages it must not import
FORBIDDEN = {
    "quant": {"io", "lora", *HIGHER_THAN_IO, "transformers", "peft", "bitsandbytes", "safetensors"},
    "lora": {"io", "quant", *HIGHER_THAN_IO, "transformers", "peft", "bitsandbytes"},
    "io": HIGHER_THAN_IO,
    "chat": {*HIGHER_THAN_IO, "io", "torch", "transformers"},
    "pipeline": {"formats", "verify", "describe", "api", "render", "cli", "demo", "train", "peft"},
    "formats": {"verify", "describe", "api", "render", "cli", "demo", "train", "peft"},
    "verify": {"formats", "describe", "api", "render", "cli", "demo", "train"},
    "dtypes.py": {"io", "quant", "lora", *HIGHER_THAN_IO},
    "errors.py": {"io", "quant", "lora", "dtypes", *HIGHER_THAN_IO},
    "render.py": {
        "io",
        "pipeline",
        "formats",
        "verify",
        "api",
        "cli",
        "demo",
        "train",
        "torch",
        "transformers",
    },
}


def _imports(path: Path) -> set[str]:
    """Top-level names a module imports: the qmerge floor (io, quant, ...) or the third-party package."""
    pkg = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])  # e.g. ["qmerge", "io"]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg[: len(pkg) - node.level + 1] + (node.module or "").split(".")
            else:
                parts = (node.module or "").split(".")
            parts = [p for p in parts if p]
            if parts == ["qmerge"]:  # from . import dtypes
                names.update(a.name for a in node.names)
                continue
            names.add(parts[1] if parts[0] == "qmerge" and len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                names.add(parts[1] if parts[0] == "qmerge" and len(parts) > 1 else parts[0])
    return names


def _files(target: str) -> list[Path]:
    return [PKG / target] if target.endswith(".py") else list((PKG / target).rglob("*.py"))


def test_layering():
    for target, banned in FORBIDDEN.items():
        files = _files(target)
        assert files, target
        for f in files:
            bad = _imports(f) & banned
            assert not bad, f"{f.relative_to(PKG.parent)} imports {sorted(bad)}"


def test_only_cli_and_demo_import_train():
    for f in PKG.rglob("*.py"):
        if f.parent.name in ("train", "demo") or f.name == "cli.py":
            continue
        assert "train" not in _imports(f), f


def test_modules_and_functions_stay_small():
    """No module above ~300 lines unless its docstring says why it is long; no function above ~40 lines in
    the floors that do the work (pipeline/, formats/, verify/)."""
    for f in PKG.rglob("*.py"):
        text = f.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert lines <= 320 or "long because" in doc, f"{f.relative_to(PKG.parent)} has {lines} lines"
    for floor in ("pipeline", "formats", "verify"):
        for f in (PKG / floor).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    size = node.end_lineno - node.lineno + 1
                    assert size <= 45, (
                        f"{f.relative_to(PKG.parent)}:{node.lineno} {node.name} has {size} lines"
                    )
