"""References for the chat-template tests: Go's own text/template (a small program built with the Go
toolchain when one is installed) and real models' chat templates (llama.cpp's collection in
models/templates/, from the llama-cpp-python source distribution: tests/conftest.py's llama_cpp_source)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qmerge.chat.ollama import collate

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(cases) -> [{"out": str} | {"error": str}], by Go's text/template; each case a dict with
    template, system and messages (as Ollama passes .System and .Messages)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go): Go's text/template is the reference")
    work = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GO111MODULE": "off", "GOFLAGS": ""}
    binary = work / "render"
    subprocess.run([go, "build", "-o", str(binary), str(HERE / "render_go.go")], check=True, env=env)

    def render(cases: list[dict]) -> list[dict]:
        done = subprocess.run(
            [str(binary)], input=json.dumps(cases), capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    return render


def ollama_case(template: str, messages: list[dict], system: str = "") -> dict:
    """A Go render case as Ollama's chat endpoint builds it: the Modelfile's SYSTEM first when the request
    has none, then collate (qmerge.chat.translate.collate, Ollama's rule)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    joined, collated = collate(messages)
    return {
        "template": template,
        "system": joined,
        "messages": [{"role": m.Role, "content": m.Content} for m in collated],
    }


@pytest.fixture(scope="session")
def llama_cpp_templates(llama_cpp_source) -> Path:
    """llama.cpp's models/templates/ directory (real models' chat templates)."""
    return llama_cpp_source / "models" / "templates"
