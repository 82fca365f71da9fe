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
