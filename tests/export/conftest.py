"""The GGUF tests' tiny models, built once a session (tests/export/models.py)."""

from __future__ import annotations

import pytest

from tests.export.models import DENSE, FAMILIES, tiny_dense, tiny_family


@pytest.fixture(scope="session")
def arch_adapters(tmp_path_factory) -> dict:
    """{architecture: (base, adapter)} for every dense architecture GGUF export writes."""
    return {arch: tiny_dense(tmp_path_factory.mktemp(arch), arch, tied) for arch, tied in DENSE}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    """{model_type: (base, adapter)} for the families transformers' own classes build (tests/export/models.py)."""
    return {mt: tiny_family(tmp_path_factory.mktemp(mt), mt) for mt in FAMILIES}
