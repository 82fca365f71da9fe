"""Shared fixtures: the committed tiny checkpoints, and references built directly with transformers/PEFT."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CACHE = Path(os.environ.get("QMERGE_TEST_CACHE", Path.home() / ".cache" / "qmerge-tests"))
# what the tests read of llama.cpp's source: real models' chat templates, and the converter with the
# gguf-py it imports (the reference for GGUF metadata and tensors)
LLAMA_CPP_PARTS = ("models/templates/", "convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def base16() -> Path:
    return FIXTURES / "tiny-llama-bf16"


@pytest.fixture(scope="session")
def base4() -> Path:
    return FIXTURES / "tiny-llama-nf4"


ADAPTERS = ["adapter-qlora", "adapter-rslora-patterns", "adapter-dora"]


@pytest.fixture
def copy_of(tmp_path):
    """Copy a fixture directory into tmp_path (for tests that must modify inputs)."""

    def _copy(name: str) -> Path:
        dst = tmp_path / Path(name).name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """The parts of llama.cpp's source the tests read (LLAMA_CPP_PARTS), from the source distribution of the
    installed llama-cpp-python (it vendors llama.cpp), fetched from the package registry into a cache on
    first use; never kept in the repository."""
    import subprocess
    import sys
    import tarfile
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("llama_cpp_python")
    except PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed")
    out = CACHE / f"llama-cpp-source-{v}"
    if out.is_dir():
        return out
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
    prefix = f"llama_cpp_python-{v}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            path = m.name.removeprefix(prefix)
            if m.isfile() and m.name.startswith(prefix) and path.startswith(LLAMA_CPP_PARTS):
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(tar.extractfile(m).read())
    tmp.rename(out)
    sdist.unlink(missing_ok=True)  # 75 MB: the parts above are what the tests read
    return out
