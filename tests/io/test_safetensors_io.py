"""Streaming safetensors I/O against the safetensors package: same bytes, same tensors, clear errors."""

from __future__ import annotations

import pytest
import safetensors.torch as st
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from qmerge.errors import InputError
from qmerge.io.safetensors import (
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
    """A slow disk makes write() wait: at most max_in_flight bytes of tensors are ever held for the writer
    (besides the fixed staging buffers)."""
    import time

    entries = [PlannedTensor(f"t{i:02d}", "F32", (256,)) for i in range(24)]  # 1 KiB each
    w = StreamingSafetensorsWriter(
        tmp_path / "x.safetensors", entries, max_in_flight=3000, stage_bytes=4096, stage_buffers=1
    )
    real = w._out.write

    def slow(buf, n):
        time.sleep(0.005)
        return real(buf, n)

    w._out.write = slow
    peak = 0
    for e in entries:
        w.wait_for_room(e.nbytes)
        w.write(e.name, torch.full((256,), float(int(e.name[1:]))))
        peak = max(peak, w._in_flight)
    w.close()
    assert 0 < peak <= 3000
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert all(torch.equal(f.read(e.name), torch.full((256,), float(int(e.name[1:])))) for e in entries)


def _tensors(n: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # sizes that straddle the 4 KiB staging buffers and end off the O_DIRECT alignment
    return {f"t{i}": torch.randn(333 * i + 5, generator=g).to(torch.bfloat16) for i in range(n)}


@pytest.mark.parametrize("mode", ["as_available", "no_o_direct", "direct_refused"])
def test_every_write_mode_gives_save_files_bytes_and_hash(tmp_path, monkeypatch, mode):
    """O_DIRECT where the filesystem takes it; buffered writes where os has no O_DIRECT (macOS) or the
    filesystem refuses a direct write with EINVAL (then the file continues buffered, from where it ended)."""
    import errno
    import hashlib
    import os

    tensors = _tensors()
    if mode == "no_o_direct":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    entries = safetensors_order(
        [PlannedTensor(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    )
    w = StreamingSafetensorsWriter(tmp_path / "me.safetensors", entries, {"format": "pt"}, stage_bytes=4096)
    if mode == "direct_refused":
        if not w._out.direct:
            pytest.skip("this filesystem takes no O_DIRECT writes")
        real, calls = os.write, {"n": 0}

        def refuse_second_direct_write(fd, data):
            calls["n"] += 1
            if fd == w._out.fd and w._out.direct and calls["n"] == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data)

        monkeypatch.setattr(os, "write", refuse_second_direct_write)
    for e in entries:
        w.write(e.name, tensors[e.name])
    w.close()
    if mode == "direct_refused":
        assert not w._out.direct and calls["n"] > 2
    if mode == "no_o_direct":
        assert not w._out.direct
    st.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "me.safetensors").read_bytes() == ref
    assert w.sha256 == hashlib.sha256(ref).hexdigest() and w.bytes == len(ref)


def test_a_failing_disk_is_reported_and_nobody_hangs(tmp_path, monkeypatch):
    import errno

    tensors = _tensors(12)
    entries = safetensors_order(
        [PlannedTensor(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    )
    w = StreamingSafetensorsWriter(
        tmp_path / "x.safetensors", entries, stage_bytes=4096, stage_buffers=1, max_in_flight=4096
    )

    def full(buf, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    w._out.write = full
    with pytest.raises(OSError, match="No space left"):
        for e in entries:
            w.wait_for_room(e.nbytes)
            w.write(e.name, tensors[e.name])
        w.close()
    w.abort()


@pytest.mark.parametrize("mode", ["cached", "dropped", "no_o_direct", "direct_refused", "no_preadv"])
def test_reads_from_the_cache_the_disk_or_plainly(tmp_path, monkeypatch, mode):
    """Large uncached ranges are read with O_DIRECT; whatever path a read takes, the tensor is the one
    safetensors saved (whole and by rows, at offsets off the 4 KiB alignment)."""
    import errno
    import os

    import qmerge.io.direct as sio

    t = torch.randn(600_001)  # 2.4 MB: above the direct-read threshold
    p = tmp_path / "m.safetensors"
    st.save_file({"a": torch.ones(3), "x": t}, p)
    direct = {"n": 0}
    real_direct = sio._read_direct

    def counting(path, buf, offset):
        direct["n"] += 1
        return real_direct(path, buf, offset)

    monkeypatch.setattr(sio, "_read_direct", counting)
    if mode == "dropped":
        if not hasattr(os, "posix_fadvise"):
            pytest.skip("no posix_fadvise here")
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    elif mode == "no_o_direct":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif mode == "no_preadv":  # as on Windows
        monkeypatch.delattr(os, "preadv", raising=False)
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    elif mode == "direct_refused":
        real_open = os.open

        def refuse(path, flags, *a, **k):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refuse)
        monkeypatch.setattr(sio, "_uncached", lambda fd, view, start: True)
    f = SafetensorsFile(p)
    assert torch.equal(f.read("x"), t)
    assert torch.equal(f.read("x", (7, 500_007)), t[7:500_007])
    assert torch.equal(f.read("a"), torch.ones(3))
    if mode in ("cached", "no_o_direct", "no_preadv"):
        assert direct["n"] == 0
    if mode == "direct_refused":
        assert direct["n"] == 2
