"""Streaming safetensors I/O against the safetensors package: same bytes, same tensors, clear errors."""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from qmerge.errors import InputError
from qmerge.io.safetensors_io import (
    DTYPE_NAMES,
    PlannedTensor,
    SafetensorsFile,
    StreamingSafetensorsWriter,
    safetensors_order,
)


def _write(path, tensors, metadata=None):
    entries = safetensors_order(
        [PlannedTensor(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    )
    w = StreamingSafetensorsWriter(path, entries, metadata)
    for e in entries:
        w.write(e.name, tensors[e.name])
    w.close()


@settings(max_examples=40, deadline=None)
@given(
    st_.lists(
        st_.tuples(st_.sampled_from(list(DTYPE_NAMES)[:9]), st_.lists(st_.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=6,
    )
)
def test_same_bytes_as_save_file(tmp_path_factory, spec):
    d = tmp_path_factory.mktemp("st")
    tensors = {}
    for i, (dtype, shape) in enumerate(spec):
        t = torch.randn(shape) * 10 if dtype.is_floating_point else torch.randint(0, 100, shape)
        tensors[f"t{i}.weight"] = t.to(dtype)
    st.save_file(tensors, d / "ref.safetensors", metadata={"format": "pt"})
    _write(d / "me.safetensors", tensors, {"format": "pt"})
    assert (d / "me.safetensors").read_bytes() == (d / "ref.safetensors").read_bytes()
    f = SafetensorsFile(d / "ref.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v)


def test_row_slices(tmp_path):
    t = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    st.save_file({"x": t}, tmp_path / "a.safetensors")
    assert torch.equal(SafetensorsFile(tmp_path / "a.safetensors").read("x", (3, 7)), t[3:7])


def test_writer_enforces_order(tmp_path):
    entries = [PlannedTensor("a", "F32", (2,)), PlannedTensor("b", "F32", (2,))]
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(RuntimeError, match="expected tensor 'a' next"):
        w.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned F32"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="closed before tensor 'b'"):
        w.close()


@pytest.mark.parametrize("damage", ["truncate", "header", "tiny", "garbage"])
def test_corrupt_files_give_clear_errors(tmp_path, damage):
    p = tmp_path / "model.safetensors"
    st.save_file({"w": torch.randn(64, 64)}, p)
    raw = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        p.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif damage == "tiny":
        p.write_bytes(b"abc")
    else:
        p.write_bytes(b"\xff" * 4096)
    with pytest.raises(InputError, match=str(p.name)):
        SafetensorsFile(p)


def test_bytes_waiting_for_the_disk_are_bounded(tmp_path):
    """A slow disk makes write() wait: at most max_in_flight bytes are ever held for the writer."""
    import time

    entries = [PlannedTensor(f"t{i:02d}", "F32", (256,)) for i in range(24)]  # 1 KiB each
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", entries, max_in_flight=3000)

    class SlowFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            time.sleep(0.005)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    w._f = SlowFile(w._f)
    peak = 0
    for e in entries:
        w.wait_for_room(e.nbytes)
        w.write(e.name, torch.full((256,), float(int(e.name[1:]))))
        peak = max(peak, w._in_flight)
    w.close()
    assert 0 < peak <= 3000
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert all(torch.equal(f.read(e.name), torch.full((256,), float(int(e.name[1:])))) for e in entries)
