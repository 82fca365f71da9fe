"""The GGUF tests' tiny models, built once a session (tests/export/models.py)."""

from __future__ import annotations

import pytest

from tests.export.models import DENSE, FAMILIES, PROJECTORS, VLM, tiny_dense, tiny_family, tiny_vlm


@pytest.fixture(scope="session")
def arch_adapters(tmp_path_factory) -> dict:
    """{architecture: (base, adapter)} for every dense architecture GGUF export writes."""
    return {arch: tiny_dense(tmp_path_factory.mktemp(arch), arch, tied) for arch, tied in DENSE}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    """{model_type: (base, adapter)} for the families transformers' own classes build (tests/export/models.py)."""
    return {mt: tiny_family(tmp_path_factory.mktemp(mt), mt) for mt in FAMILIES}


@pytest.fixture(scope="session")
def vlm_models(tmp_path_factory) -> dict:
    """{name: (base, adapter)} for the vision-language models whose language model GGUF export writes."""
    return {name: tiny_vlm(tmp_path_factory.mktemp(name), name) for name in VLM}


@pytest.fixture(scope="session")
def projector_models(tmp_path_factory) -> dict:
    """{name: (base, adapter)} for the vision-language models whose projector GGUF export writes, the
    adapter changing the vision tower too."""
    return {name: tiny_vlm(tmp_path_factory.mktemp(name), name, vision=True) for name in PROJECTORS}
