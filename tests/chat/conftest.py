"""References for the chat-template tests: Go's own text/template (a small program built with the Go
toolchain when one is installed) and real models' chat templates (llama.cpp's collection in
models/templates/, read from the llama-cpp-python source distribution, fetched from the package registry
into a cache on first use, never kept in the repository)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from qmerge.chat.ollama import collate

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("QMERGE_TEST_CACHE", Path.home() / ".cache" / "qmerge-tests"))


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
def llama_cpp_templates() -> Path:
    """llama.cpp's models/templates/ directory (real models' chat templates), from the sdist of the
    installed llama-cpp-python."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("llama_cpp_python")
    except PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed")
    out = CACHE / f"llama-cpp-templates-{v}"
    if not out.is_dir():
        sdist_dir = CACHE / "sdist"
        sdist = sdist_dir / f"llama_cpp_python-{v}.tar.gz"
        if not sdist.exists():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
            done = subprocess.run(
                [*cmd, "-d", str(sdist_dir), f"llama-cpp-python=={v}"], capture_output=True, timeout=600
            )
            if done.returncode or not sdist.exists():
                pytest.skip(f"llama-cpp-python {v}'s source distribution could not be fetched")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if "/models/templates/" in m.name and m.name.endswith(".jinja") and m.isfile():
                    (tmp / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        tmp.rename(out)
        sdist.unlink(missing_ok=True)  # 75 MB: the templates are what the tests read
    return out
