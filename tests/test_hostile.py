"""Hostile and mistaken inputs, as a careless user or an attacker would give them: every one ends with exit
1 or 2 and one message naming the file and the problem, never a traceback, never an output, and never a
changed input (CONTRACT.md). The committed cases live in tests/hostile/ (make_hostile.py remakes them)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qmerge.cli import cli

HOSTILE = Path(__file__).resolve().parent / "hostile"
CASES = sorted(p.name for p in (HOSTILE / "cases").iterdir())


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def run(args: list, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


def assert_refused(r, code: int, pattern: str) -> None:
    text = r.stderr + r.stdout
    assert r.exit_code == code, text
    assert "Traceback" not in text and "unexpected" not in text, text
    assert re.search(pattern, r.stderr), r.stderr


@pytest.fixture
def clean(tmp_path) -> Path:
    shutil.copytree(HOSTILE / "clean", tmp_path / "in")
    return tmp_path / "in"


@pytest.mark.parametrize("case", CASES)
def test_hostile_file(case, clean, tmp_path):
    d = HOSTILE / "cases" / case
    spec = json.loads((d / "case.json").read_text())
    for f in d.rglob("*"):
        if f.is_file() and f.name != "case.json":
            shutil.copy(f, clean / f.relative_to(d))
    before = digest(clean)
    out = tmp_path / "out"
    args = [
        a.format(adapter=clean / "adapter", base4=clean / "base4", base16=clean / "base16", out=out)
        for a in spec["args"]
    ]
    assert_refused(run(args), spec["exit"], re.escape(spec["message"]))
    assert digest(clean) == before, "an input was modified"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*")), "an output was left"


def test_clean_inputs_merge(clean, tmp_path):
    """The micro model the cases start from is fine: every case fails because of its one change."""
    for base in ("base4", "base16"):
        r = run(["merge", clean / "adapter", "--base", clean / base, "-o", tmp_path / base, "--json"])
        assert r.exit_code == 0, r.output


# ---- outputs never touch inputs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,pattern",
    [
        ("{base16}", "is the input directory"),
        ("{adapter}", "is the input directory"),
        ("{root}", "holds the input directory"),
        ("{base16}/merged", "is inside the input directory"),
        ("{link}", "is the input directory"),
    ],
)
def test_output_is_never_an_input(clean, target, pattern):
    (clean / "link").symlink_to(clean / "base16")
    before = digest(clean / "base16") + digest(clean / "adapter")
    out = target.format(base16=clean / "base16", adapter=clean / "adapter", root=clean, link=clean / "link")
    r = run(["merge", clean / "adapter", "--base", clean / "base16", "-o", out, "--force"])
    assert_refused(r, 1, pattern)
    assert digest(clean / "base16") + digest(clean / "adapter") == before


def test_gguf_over_a_base_file_is_refused(clean):
    target = clean / "base16" / "model.safetensors"
    r = run(
        ["export", clean / "adapter", "--base", clean / "base16", "--to", "gguf", "-o", target, "--force"]
    )
    assert_refused(r, 1, "inside the input directory")


def test_force_replaces_only_what_qmerge_wrote(clean, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    merge = ["merge", clean / "adapter", "--base", clean / "base4", "-o", out, "--force"]
    assert_refused(run(merge), 1, "qmerge_provenance.json")
    assert (out / "notes.txt").read_text() == "mine"
    shutil.rmtree(out)
    assert run(merge).exit_code == 0
    assert run(merge).exit_code == 0  # its own output: replaced
    (out / "notes.txt").write_text("mine")
    assert_refused(run(merge), 1, "holds notes.txt")
    gguf = tmp_path / "m.gguf"
    gguf.write_text("not a model")
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"  # a base with a tokenizer, for GGUF
    export = [
        "export",
        fixtures / "adapter-dora",
        "--base",
        fixtures / "tiny-llama-bf16",
        "--to",
        "gguf",
        "-o",
        gguf,
        "--force",
    ]
    assert_refused(run(export), 1, "not a GGUF file")
    gguf.unlink()
    assert run(export).exit_code == 0 and run(export).exit_code == 0


def test_a_second_run_on_the_same_output_fails(clean, tmp_path):
    import fcntl

    out = tmp_path / "m"
    fd = os.open(tmp_path / ".m.qmerge-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a run in progress holds it
    try:
        r = run(["merge", clean / "adapter", "--base", clean / "base4", "-o", out])
        assert_refused(r, 1, "another qmerge run is writing")
    finally:
        os.close(fd)
    assert not out.exists()


def test_leftovers_of_killed_runs_are_removed(clean, tmp_path):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".m.qmerge-tmp-{dead}").mkdir()
    (tmp_path / f".m.qmerge-tmp-{dead}" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".m.qmerge-tmp-{dead}.intermediate.gguf").write_bytes(b"half")
    (tmp_path / f".other.qmerge-tmp-{dead}").mkdir()  # another output's: not ours to touch
    r = run(["merge", clean / "adapter", "--base", clean / "base4", "-o", tmp_path / "m"])
    assert r.exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "m", f".other.qmerge-tmp-{dead}"])


def test_read_only_output_directory(clean, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = run(["merge", clean / "adapter", "--base", clean / "base4", "-o", ro / "m"])
    assert_refused(r, 1, "cannot write there")


# ---- inputs that are not files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["base16/model.safetensors", "base16/config.json", "adapter/adapter_config.json"]
)
def test_fifo_is_refused_not_waited_on(clean, tmp_path, name):
    (clean / name).unlink()
    os.mkfifo(clean / name)
    r = run(["merge", clean / "adapter", "--base", clean / "base16", "-o", tmp_path / "m"])
    assert_refused(r, 1, "not a regular file")


def test_inspect_never_reads_more_than_a_block_of_a_large_tensor(clean, monkeypatch):
    """inspect scans adapter tensors for NaN a block of rows at a time (a 2.5 GB tensor, 64 MB of memory)."""
    import qmerge.description as d

    monkeypatch.setattr(d, "_SCAN_BYTES", 64)  # the micro adapter's tensors are 256 bytes and more
    reads = []
    real = d.Adapter.get

    def spy(self, key):
        reads.append(key)
        return real(self, key)

    monkeypatch.setattr(d.Adapter, "get", spy)
    info = d.describe(clean / "adapter")
    assert not reads and not [p for p in info.problems if p["severity"] == "error"]


# ---- the gate's own options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--max-kl", "nan"],
        ["--max-kl", "-1"],
        ["--min-top1", "nan"],
        ["--min-top1", "2"],
        ["--max-abs-diff", "inf"],
    ],
)
def test_thresholds_that_would_switch_the_gate_off(clean, option):
    r = run(
        ["check", clean / "adapter", "--base", clean / "base16", "--candidate", clean / "base16", *option]
    )
    assert r.exit_code == 2 and "must be a finite number" in r.stderr, r.output


@pytest.mark.parametrize(
    "content,pattern", [(b"", "is empty"), (b"  \n", "is empty"), (b"\x00\x01\xff\xfe", "not UTF-8")]
)
def test_text_file_that_is_not_text(clean, tmp_path, content, pattern):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    r = run(
        [
            "check",
            clean / "adapter",
            "--base",
            clean / "base16",
            "--candidate",
            clean / "base16",
            "--text",
            text,
        ]
    )
    assert_refused(r, 1, pattern)


def test_candidates_that_are_not_this_model(clean, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    r = run(["check", clean / "adapter", "--base", clean / "base16", "--candidate", bad])
    assert_refused(r, 1, "llama.cpp cannot load")
    r = run(
        [
            "check",
            clean / "adapter",
            "--base",
            clean / "base16",
            "--candidate",
            Path(__file__).parent.parent / "fixtures" / "tiny-llama-bf16",
        ]
    )
    assert_refused(r, 1, "another vocabulary")


# ---- interrupts -----------------------------------------------------------------------------------------


def test_interrupt_stops_the_llama_cpp_quantizer(tmp_path, monkeypatch):
    """llama.cpp's quantizer is one C call a signal cannot stop: it runs in a child that an interrupt kills.

    Ctrl-C is sent every 0.3 s while the child runs, and raises only then: one signal alone can land in a
    finalizer that the garbage collector runs meanwhile (its KeyboardInterrupt is then printed and dropped,
    and the child ran its 60 s: seen once in a full run); a late one, after the child is gone, is ignored."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    import qmerge.llama_cpp as lc

    started = []
    monkeypatch.setattr(
        lc, "quantize_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    real_popen = subprocess.Popen

    def running() -> bool:
        return bool(started) and started[0].poll() is None

    def interrupt(signum, frame):
        if running():
            raise KeyboardInterrupt

    def keep_interrupting():
        time.sleep(0.3)
        while running():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)

    sender = threading.Thread(target=keep_interrupting, daemon=True)

    def popen(*a, **k):
        started.append(real_popen(*a, **k))
        sender.start()
        return started[-1]

    monkeypatch.setattr(lc.subprocess, "Popen", popen)
    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            lc.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "q4_k_m")
    finally:
        if sender.is_alive():
            started[0].kill()  # (a failure above): no more signals once the child is gone
            sender.join()
        signal.signal(signal.SIGINT, previous)  # after the sender is done: none arrives later
    assert started and started[0].poll() is not None  # the child was stopped, not left running


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_export_leaves_nothing(tmp_path, sig, code):
    """Ctrl-C or SIGTERM while a K-quant GGUF is written: exit 130/143, one message, no output, no temporaries."""
    import signal
    import subprocess
    import sys
    import time

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    out = tmp_path / "m.gguf"
    cmd = [
        sys.executable,
        "-m",
        "qmerge",
        "export",
        fixtures / "adapter-qlora",
        "--base",
        fixtures / "tiny-llama-bf16",
    ]
    cmd += ["--to", "gguf", "--gguf-type", "q4_k_m", "-o", out]
    for _attempt in range(3):
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while (
            proc.poll() is None and time.time() < deadline and not list(tmp_path.glob(".m.gguf.qmerge-tmp-*"))
        ):
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished before the signal: try again
            out.unlink()
            continue
        assert proc.returncode == code, err
        assert b"interrupted; nothing was written" in err and b"Traceback" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
        return
    pytest.skip("the export finished before the signal three times")


def test_unwritable_output_directory(clean, tmp_path, monkeypatch):
    """A directory the user cannot write to (simulated: this suite may run as root, who can write anywhere)."""
    import errno

    real = Path.mkdir

    def denied(self, *a, **k):
        if ".qmerge-tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    r = run(["merge", clean / "adapter", "--base", clean / "base4", "-o", tmp_path / "m"])
    assert_refused(r, 1, "cannot write there")


def test_disk_full_inside_llama_cpp_quantizer(tmp_path, monkeypatch):
    import sys

    import qmerge.llama_cpp as lc

    script = "import sys; sys.stderr.write('llama_model_quantize: failed to write: No space left on device\\n'); sys.exit(1)"
    monkeypatch.setattr(lc, "quantize_command", lambda *a: [sys.executable, "-c", script])
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    out = tmp_path / "m.gguf"
    r = run(
        ["export", fixtures / "adapter-qlora", "--base", fixtures / "tiny-llama-bf16", "--to", "gguf"]
        + ["--gguf-type", "q4_k_m", "-o", out]
    )
    assert_refused(r, 1, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_config_check_in_the_background_stops_the_merge(clean, tmp_path):
    """From a 4-bit base, `qmerge merge` checks config.json in a child process while it merges (the check
    needs transformers, which the merge does not): a mismatch still ends with exit 1 and no output."""
    import subprocess
    import sys

    case = HOSTILE / "cases" / "config-more-layers"
    shutil.copy(case / "base4" / "config.json", clean / "base4" / "config.json")
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "qmerge", "merge", clean / "adapter", "--base", clean / "base4", "-o", out]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "the weights lack" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".m*"))
