"""Fuzzing every reader with hypothesis, as the safetensors project fuzzes its own: whatever the bytes, a
reader returns something that is valid by the format's reference (the safetensors library,
bitsandbytes' rules, PEFT's config rules) or raises InputError; never another exception, never a hang."""

from __future__ import annotations

import contextlib
import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from qmerge.errors import InputError
from qmerge.io.adapter import read_settings
from qmerge.io.bnb import parse_state
from qmerge.io.safetensors import DTYPES, ITEMSIZE, SafetensorsFile, read_header
from qmerge.quant.codebooks import BLOCKSIZES_4BIT

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


@st.composite
def safetensors_files(draw) -> bytes:
    """Headers that are mostly well-formed, with one of many things wrong (or nothing)."""
    n = draw(st.integers(0, 4))
    entries, pos, data = {}, 0, b""
    for i in range(n):
        dtype = draw(st.sampled_from([*DTYPES, "F128", "Q4"]))
        shape = draw(st.lists(st.integers(-2, 5), max_size=3))
        size = math.prod(shape) * ITEMSIZE.get(dtype, 1) if all(d >= 0 for d in shape) else 4
        size = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, 10**12])))
        start = pos + draw(st.sampled_from([0, 0, 0, -4, 4]))
        offsets = draw(
            st.sampled_from([[start, start + size], [str(start), start + size], [start + size, start]])
        )
        entries[f"t{i}" if not draw(st.booleans()) or i == 0 else "t0"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": offsets,
        }
        pos = max(pos, start + size)
    data = bytes(min(max(pos, 0), 4096)) + bytes(draw(st.integers(0, 2)) * 3)
    header = json.dumps(entries).encode()
    if draw(st.booleans()):
        header = header[: draw(st.integers(0, len(header)))]
    length = len(header) + draw(st.sampled_from([0, 0, 0, 5, -3, 10**9]))
    return struct.pack("<Q", max(length, 0)) + header + data


@FUZZ
@given(safetensors_files())
def test_read_header_accepts_only_what_safetensors_accepts(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    try:
        infos, _ = read_header(path)
    except InputError:
        return
    f = SafetensorsFile(path)
    with safe_open(str(path), "pt") as ref:  # the reference must open it too
        assert sorted(ref.keys()) == sorted(infos)
        for name in infos:
            assert torch.equal(f.read(name), ref.get_tensor(name))


@FUZZ
@given(st.binary(max_size=64))
def test_read_header_on_random_bytes(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    with contextlib.suppress(InputError):
        read_header(path)


quant_states = st.fixed_dictionaries(
    {},
    optional={
        "quant_type": st.sampled_from(["nf4", "fp4", "int4"]) | json_scalars,
        "blocksize": st.sampled_from([0, 7, 64, 4096, 8192]) | json_scalars,
        "dtype": st.sampled_from(["bfloat16", "float32", "float8"]) | json_scalars,
        "shape": st.lists(st.integers(-1, 300), max_size=3) | json_values,
        "nested_offset": st.floats() | json_scalars,
        "nested_blocksize": st.sampled_from([256, 0, -1]) | json_scalars,
        "nested_dtype": st.sampled_from(["float32", "bfloat16"]) | json_scalars,
    },
)


@FUZZ
@given(quant_states | json_values)
def test_quant_state_json(state):
    try:
        e = parse_state("w.weight.quant_state.bitsandbytes__nf4", json.dumps(state).encode(), "base")
    except InputError:
        return
    assert e.quant_type in ("nf4", "fp4") and e.blocksize in BLOCKSIZES_4BIT
    assert e.shape and all(type(d) is int and d > 0 for d in e.shape)
    assert e.nested_offset is None or math.isfinite(e.nested_offset)


adapter_configs = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(-2, 64) | json_scalars,
        "lora_alpha": st.floats() | json_scalars,
        "use_rslora": json_scalars,
        "use_dora": json_scalars,
        "fan_in_fan_out": json_scalars,
        "rank_pattern": st.dictionaries(
            st.sampled_from(["q_proj", "(", "a|b", "[x"]), st.integers(-1, 8) | json_scalars
        )
        | json_values,
        "alpha_pattern": st.dictionaries(st.sampled_from(["v_proj", ")"]), st.floats() | json_scalars)
        | json_values,
    },
)


@FUZZ
@given(adapter_configs)
def test_adapter_settings(tmp_path, config):
    try:
        s = read_settings(config, tmp_path)
    except InputError:
        return
    assert type(s.r) is int and s.r > 0 and math.isfinite(s.lora_alpha)
    assert all(type(v) is int and v > 0 for v in s.rank_pattern.values())
    assert all(math.isfinite(v) for v in s.alpha_pattern.values())
    from qmerge.lora.scaling import module_scaling

    module_scaling(s, "model.layers.0.self_attn.q_proj")  # patterns compile and apply


@pytest.mark.parametrize("payload", [b"\x00" * 8, b"[]", b"null", b'"text"', b"\xff\xfe{}"])
def test_json_configs_that_are_not_objects(tmp_path, payload):
    from qmerge.io.files import read_json

    (tmp_path / "config.json").write_bytes(payload)
    with pytest.raises(InputError):
        read_json(tmp_path / "config.json")
