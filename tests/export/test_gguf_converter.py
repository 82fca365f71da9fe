"""qmerge's GGUF files against llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python
source distribution, never kept in the repository), on every architecture GGUF export writes: the same
merged model converted both ways gives the same tensors (names, shapes, types, bytes) and the same
hyperparameters. The vocabulary is left out of the converter (tests/export/run_converter.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qmerge.api import export
from tests.export.models import DENSE, FAMILIES, VLM

pytest.importorskip("llama_cpp")
HERE = Path(__file__).resolve().parent
# (the converter writes SmolVLM's language model only from the text model saved alone, and fails on GPT-NeoX
# under transformers 5, whose config moves rotary_pct into rope_parameters: no reference for those here)
NAMES = [arch for arch, _ in DENSE] + sorted(set(FAMILIES) - {"gpt_neox"}) + sorted(set(VLM) - {"idefics3"})
TYPES = ("f32", "q8_0")


@pytest.fixture(scope="session")
def converted(llama_cpp_source, arch_adapters, family_models, vlm_models, tmp_path_factory):
    """{name: folder} with qmerge-TYPE.gguf and llama.cpp-TYPE.gguf of one merged bf16 model, and the
    converter's failures (its output)."""
    root = tmp_path_factory.mktemp("converter")
    jobs = []
    for name, (base, adapter) in {**arch_adapters, **family_models, **vlm_models}.items():
        if name not in NAMES:
            continue
        (root / name).mkdir()
        export(adapter, "bf16", root / name / "merged", base=base)
        for t in TYPES:
            export(root / name / "merged", "gguf", root / name / f"qmerge-{t}.gguf", gguf_type=t)
            mtp = name in ("qwen3_next", "qwen3_5_text", "qwen3_5_vlm")  # (qmerge leaves out MTP layers)
            flag = ":no-mtp" if mtp else ""
            jobs += [str(root / name / "merged"), t + flag, str(root / name / f"llama.cpp-{t}.gguf")]
    converter = str(llama_cpp_source / "convert_hf_to_gguf.py")
    done = subprocess.run(
        [sys.executable, str(HERE / "run_converter.py"), converter, *jobs],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return root, done.stdout + done.stderr[-3000:]


def _metadata(reader, arch: str) -> dict:
    """The hyperparameters (not the vocabulary, not general.*), with the keys one side writes where the
    other relies on llama.cpp's default left out when they hold that default."""
    out = {k: f.contents() for k, f in reader.fields.items() if k.startswith(f"{arch}.")}
    head_dim = out[f"{arch}.embedding_length"] // out[f"{arch}.attention.head_count"]
    heads = out[f"{arch}.attention.head_count"]
    for key, default in {"attention.key_length": head_dim, "attention.value_length": head_dim,
                         "attention.head_count_kv": heads, "rope.dimension_count": head_dim, "vocab_size": None,
                         "rope.freq_base": 10000.0, "rope.scaling.type": "none"}.items():  # fmt: skip
        if out.get(f"{arch}.{key}", default) in (default, None) or key == "vocab_size":
            out.pop(f"{arch}.{key}", None)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("gtype", TYPES)
def test_same_file_as_llama_cpps_converter(converted, name, gtype):
    import gguf

    root, log = converted
    theirs_path = root / name / f"llama.cpp-{gtype}.gguf"
    assert theirs_path.exists(), log
    ours, theirs = (
        gguf.GGUFReader(str(root / name / f"qmerge-{gtype}.gguf")),
        gguf.GGUFReader(str(theirs_path)),
    )
    ta, tb = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert (ta[n].tensor_type, list(ta[n].shape)) == (tb[n].tensor_type, list(tb[n].shape)), n
        a, b = ta[n].data, tb[n].data
        if n == "per_layer_token_embd.weight":  # Gemma 3n's rows after the stored table: token 0's, as
            stored = FAMILIES[name]["vocab_size_per_layer_input"]  # transformers looks them up (theirs: 0)
            assert (a[stored:] == a[0]).all() and not b[stored:].any()
            a, b = a[:stored], b[:stored]
        if name == "bamba" and n.endswith(("attn_q.weight", "attn_k.weight")):
            b = b[_partial_rows(len(b), 4 if "attn_q" in n else 2, 8)]
        assert np.array_equal(a, b), n
    arch = ours.fields["general.architecture"].contents()
    assert arch == theirs.fields["general.architecture"].contents()
    mine, converters = _metadata(ours, arch), _metadata(theirs, arch)
    if name == "bamba":  # RoPE on half of each head (the released config's attn_rotary_emb; the converter
        assert mine.pop(f"{arch}.rope.dimension_count") == 8  # reads no partial_rotary_factor)
    assert mine == converters
    assert ours.fields["general.file_type"].contents() == theirs.fields["general.file_type"].contents()


def _partial_rows(rows: int, n_head: int, rope_dims: int) -> np.ndarray:
    """The converter permutes each head's rows whole for llama.cpp's RoPE; Bamba rotates the first rope_dims
    of each head only, so only those rows are permuted (granite_hybrid.permute_rotary): the converter's rows in
    qmerge's order."""
    import torch

    from qmerge.io.gguf.arch import permute_qk
    from qmerge.io.gguf.granite_hybrid import permute_rotary

    index = torch.arange(rows).reshape(rows, 1)
    whole = permute_qk(index, n_head).flatten()
    return whole.argsort()[permute_rotary(index, n_head, rope_dims).flatten()].numpy()
