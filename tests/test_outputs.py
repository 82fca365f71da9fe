"""Nothing lost, round 2 (issue 20): the output lock, the final rename, `--report`, values a dtype cannot
hold, and the mistaken inputs that were merged or reported wrongly. Each test failed before the fix it pins.
The micro model of tests/hostile/clean keeps them fast; GGUF cases use the fixtures (they need a tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmerge.errors import OptionError, OutputError, QmergeError
from qmerge.io import atomic, commit
from tests.test_hostile import HOSTILE, assert_refused, digest, run

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def clean(tmp_path) -> Path:
    shutil.copytree(HOSTILE / "clean", tmp_path / "in")
    return tmp_path / "in"


def merge_args(clean: Path, out: Path, base: str = "base4", *more) -> list:
    return ["merge", clean / "adapter", "--base", clean / base, "-o", out, *more]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".qmerge-" in p.name)


# ---- the lock ---------------------------------------------------------------------------------------------


def test_a_refused_run_leaves_the_holders_lock(clean, tmp_path):
    """Run A holds OUT; run B is refused and must not remove A's lock, so run C is refused too."""
    out = tmp_path / "m"
    lock = tmp_path / ".m.qmerge-lock"
    with atomic.atomic_dir(out):  # run A, in progress
        held = os.stat(lock)
        for _run in ("B", "C"):
            assert_refused(run(merge_args(clean, out)), 1, "another qmerge run is writing")
            assert lock.exists() and os.stat(lock).st_ino == held.st_ino
    assert not lock.exists() and out.is_dir()  # A finished: its lock is gone, its output in place


def test_a_lock_on_a_file_its_holder_removed_is_taken_again(tmp_path):
    """A run that opened the lock file just before its holder removed it locks the new one instead of
    proceeding on the removed file beside a third run."""
    out = tmp_path / "m"
    lock = tmp_path / ".m.qmerge-lock"
    real_flock = atomic._flock
    calls = []

    def flock(fd, where):
        if not calls:  # the holder finishes between this run's open and its flock
            lock.unlink()
            lock.write_text("held by another run\n")
        calls.append(fd)
        real_flock(fd, where)

    atomic._flock = flock
    try:
        with atomic.atomic_file(out) as tmp:
            tmp.write_text("x")
            assert os.stat(lock).st_ino == os.fstat(calls[-1]).st_ino
    finally:
        atomic._flock = real_flock
    assert len(calls) == 2 and out.read_text() == "x"


# ---- the final rename ---------------------------------------------------------------------------------------


def test_a_file_that_appears_at_out_during_an_export_is_kept(tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"

    def appear(tmp, target):
        target.write_text("the user's file")

    monkeypatch.setattr(commit, "before_commit", [appear])
    r = run(
        ["export", FIXTURES / "adapter-qlora", "--base", FIXTURES / "tiny-llama-bf16"]
        + ["--to", "gguf", "-o", out]
    )
    assert_refused(r, 1, "appeared during the run")
    assert out.read_text() == "the user's file" and leftovers(tmp_path) == []


def test_a_directory_that_appears_at_out_during_a_merge_is_kept(clean, tmp_path, monkeypatch):
    out = tmp_path / "m"

    def appear(tmp, target):
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    monkeypatch.setattr(commit, "before_commit", [appear])
    assert_refused(run(merge_args(clean, out)), 1, "appeared during the run")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]
    assert leftovers(tmp_path) == []


def test_forced_replacement_of_an_output_replaced_during_the_run(clean, tmp_path, monkeypatch):
    """--force replaces the qmerge output that was at OUT when the run started, not what replaced it since."""
    out = tmp_path / "m"
    assert run(merge_args(clean, out)).exit_code == 0

    def replace_it(tmp, target):
        shutil.rmtree(target)
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    monkeypatch.setattr(commit, "before_commit", [replace_it])
    assert_refused(run(merge_args(clean, out, "base4", "--force")), 1, "appeared during the run")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and leftovers(tmp_path) == []


def test_forced_replacement_of_an_output_a_user_wrote_into_during_the_run(clean, tmp_path, monkeypatch):
    out = tmp_path / "m"
    assert run(merge_args(clean, out)).exit_code == 0

    def add_notes(tmp, target):
        (target / "notes.txt").write_text("mine")

    monkeypatch.setattr(commit, "before_commit", [add_notes])
    assert_refused(run(merge_args(clean, out, "base4", "--force")), 1, "appeared during the run")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_forced_replacement_still_replaces(clean, tmp_path):
    out = tmp_path / "m"
    assert run(merge_args(clean, out)).exit_code == 0
    before = os.stat(out).st_ino
    assert run(merge_args(clean, out, "base4", "--force")).exit_code == 0
    assert (
        os.stat(out).st_ino != before and (out / "model.safetensors").exists() and leftovers(tmp_path) == []
    )


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_commit_without_renameat2(tmp_path, monkeypatch, exchange):
    """Where the system has no renameat2, the commit checks and renames; the rules stay the same."""
    if not exchange:
        monkeypatch.setattr(commit, "_rename2", lambda *a: False)
    out = tmp_path / "f"
    with atomic.atomic_file(out) as tmp:
        tmp.write_text("1")
    with atomic.atomic_file(out, force=True, owned=lambda p: None) as tmp:
        tmp.write_text("2")
    assert out.read_text() == "2"
    monkeypatch.setattr(
        commit, "before_commit", [lambda tmp, target: target.unlink() or target.write_text("u")]
    )
    with (
        pytest.raises(OutputError, match="appeared during the run"),
        atomic.atomic_file(out, force=True, owned=lambda p: None) as tmp,
    ):
        tmp.write_text("3")
    assert out.read_text() == "u" and leftovers(tmp_path) == []


def test_checks_still_running_are_confirmed_before_any_commit(tmp_path):
    """Every output waits for the checks of its inputs (the background config check) before it is renamed
    into place, whichever writer made it."""

    def found():
        raise QmergeError("config.json does not match the weights")

    out = tmp_path / "f"
    with (
        pytest.raises(QmergeError, match="does not match"),
        atomic.atomic_file(out, inputs=atomic.Inputs(confirm=found)) as tmp,
    ):
        tmp.write_text("x")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_source_hands_its_background_check_to_every_output(clean, tmp_path):
    """An output written with source.inputs() (as every writer does) hears the background check's verdict."""
    from qmerge.pipeline.fit import Problem
    from qmerge.pipeline.source import open_checkpoint

    class Found:  # a finished background check that found a problem
        def done(self):
            return True

        def problems(self):
            return [Problem("error", "config.json does not match the weights: the weights lack x", "base")]

    source = open_checkpoint(clean / "adapter", clean / "base4")
    source.base_check = Found()
    out = tmp_path / "f"
    with (
        pytest.raises(QmergeError, match="the weights lack x"),
        atomic.atomic_file(out, inputs=source.inputs()) as tmp,
    ):
        tmp.write_text("x")
    assert not out.exists() and source.base_check is None


def test_config_check_in_the_background_stops_a_calibrated_export(tmp_path):
    """The calibrated NF4 route writes its own directory: it too hears the background check's verdict."""
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "tiny-llama-nf4", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (base / "config.json").write_text(json.dumps(cfg))
    data = tmp_path / "cal.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "qmerge", "export", FIXTURES / "adapter-qlora", "--base", base]
    cmd += ["--to", "nf4", "--calibrate", data, "-o", out]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "the weights lack" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and leftovers(tmp_path) == []


# ---- --report is an output like any other -----------------------------------------------------------------


def check_args(clean: Path, report: Path, *more) -> list:
    return ["check", clean / "adapter", "--base", clean / "base16", "--candidate", clean / "base16"] + [
        "--report",
        report,
        "--max-seqs",
        "1",
        "--seq-len",
        "8",
        "--max-kl",
        "1000",
        "--min-top1",
        "0",
        *more,
    ]


def test_report_never_lands_in_an_input(clean):
    readme = clean / "adapter" / "README.md"
    readme.write_text("# my adapter card")
    before = digest(clean)
    assert_refused(run(check_args(clean, readme, "--force")), 1, "input directory")
    assert readme.read_text() == "# my adapter card" and digest(clean) == before


def test_report_replaces_only_a_report_qmerge_wrote(clean, tmp_path):
    mine = tmp_path / "notes.md"
    mine.write_text("my notes")
    assert_refused(run(check_args(clean, mine)), 1, "already exists; pass --force")
    assert_refused(run(check_args(clean, mine, "--force")), 1, "not a report qmerge wrote")
    assert mine.read_text() == "my notes"
    report = tmp_path / "check.html"
    assert run(check_args(clean, report)).exit_code == 0
    assert_refused(run(check_args(clean, report)), 1, "already exists")
    first = report.read_text()
    assert run(check_args(clean, report, "--force")).exit_code == 0
    assert report.read_text().startswith("<!-- qmerge check report -->") and first.startswith("<!--")


# ---- values a dtype cannot hold ---------------------------------------------------------------------------------


@pytest.fixture
def overflowing(tmp_path) -> Path:
    """The QLoRA fixture with one lora_B scaled so that a merged weight passes 65504 (finite in fp32/bf16)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "adapter-qlora", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.full_like(tensors[key], 1e6)
    save_file(tensors, adapter / "adapter_model.safetensors")
    return adapter


@pytest.mark.parametrize(
    "args",
    [
        ["merge", "--dtype", "fp16"],
        ["export", "--to", "fp16"],
        ["export", "--to", "gguf", "--gguf-type", "f16"],
    ],
    ids=["merge-fp16", "export-fp16", "gguf-f16"],
)
def test_a_cast_that_overflows_is_refused(overflowing, tmp_path, args):
    out = tmp_path / ("m.gguf" if "gguf" in args else "m")
    r = run([args[0], overflowing, "--base", FIXTURES / "tiny-llama-bf16", *args[1:], "-o", out])
    assert_refused(r, 1, r"q_proj\.weight: its values reach [0-9.e+]+, beyond what float16 holds")
    assert "bf16" in r.stderr and not out.exists() and leftovers(tmp_path) == []


def test_the_same_adapter_merges_in_bf16(overflowing, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m"
    r = run(["merge", overflowing, "--base", FIXTURES / "tiny-llama-bf16", "-o", out, "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
        assert max(f.get_tensor(k).abs().max().item() for k in f.keys()) > 65504


def test_cast_finite_keeps_what_fp32_already_holds():
    from qmerge.dtypes import cast_finite

    x = torch.tensor([1.0, float("inf"), 1e6])
    assert torch.isinf(cast_finite(x, torch.float16, "w")).sum() == 2  # inf was there before the cast
    with pytest.raises(OutputError, match="w: its values reach 1e\\+06"):
        cast_finite(torch.tensor([1.0, 1e6]), torch.float16, "w")


# ---- inputs that were merged, or reported, wrongly ------------------------------------------------------------


def modules_to_save_adapter(clean: Path, dst: Path, rows: int) -> Path:
    from tests.helpers import random_adapter

    random_adapter(clean / "base16", dst, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(dst / "adapter_model.safetensors")
    key = next(k for k in tensors if "lm_head" in k)
    tensors[key] = torch.randn(rows, tensors[key].shape[1])
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_an_output_layer_of_another_vocabulary_is_refused(clean, tmp_path):
    adapter = modules_to_save_adapter(clean, tmp_path / "a", rows=10)
    r = run(["merge", adapter, "--base", clean / "base16", "-o", tmp_path / "m"])
    assert_refused(r, 1, "vocabulary sizes would disagree")
    assert not (tmp_path / "m").exists()


def test_target_modules_that_select_nothing_are_refused(clean, tmp_path):
    cfg_path = clean / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["c_attn"]
    cfg_path.write_text(json.dumps(cfg))
    for base in ("base4", "base16"):  # checked in the background child, and in process
        r = run(merge_args(clean, tmp_path / base, base))
        assert_refused(r, 1, "select none of the 7 modules")
        assert not (tmp_path / base).exists()


def test_target_modules_as_peft_matches_them(clean, tmp_path):
    """Suffixes, a regex and layers_to_transform select what PEFT selects: these merge."""
    cfg_path = clean / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for targets in (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        r".*_proj",
    ):
        cfg["target_modules"] = targets
        cfg_path.write_text(json.dumps(cfg))
        out = tmp_path / str(len(str(targets)))
        assert run(merge_args(clean, out, "base16")).exit_code == 0


def test_lora_alpha_zero_merges_with_a_warning(clean, tmp_path):
    cfg_path = clean / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = 0
    cfg_path.write_text(json.dumps(cfg))
    r = run(merge_args(clean, tmp_path / "m", "base4", "--json"))
    assert r.exit_code == 0
    assert any("lora_alpha is 0" in w for w in json.loads(r.stdout)["warnings"])
    r = run(merge_args(clean, tmp_path / "m2"))
    assert r.exit_code == 0 and "warning:" in r.stderr and "lora_alpha is 0" in r.stderr


def test_an_index_that_omits_a_shard_says_so(clean, tmp_path):
    base = tmp_path / "sharded"
    assert (
        run(["export", clean / "base16", "--to", "bf16", "-o", base, "--max-shard-size", "8KB"]).exit_code
        == 0
    )
    index = base / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    last = sorted(set(doc["weight_map"].values()))[-1]
    doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if v != last}
    index.write_text(json.dumps(doc))
    assert_refused(
        run(["merge", clean / "adapter", "--base", base, "-o", tmp_path / "m"]), 1, "the index omits"
    )


def test_a_gguf_candidate_of_another_vocabulary(clean, tmp_path):
    gguf = tmp_path / "other.gguf"
    assert run(["export", FIXTURES / "tiny-llama-bf16", "--to", "gguf", "-o", gguf]).exit_code == 0
    r = run(["check", clean / "adapter", "--base", clean / "base16", "--candidate", gguf])
    assert_refused(r, 1, r"another vocabulary \(\d+ tokens; the unmerged model has 64\)")


def test_a_tensor_too_large_for_memory_is_named(clean, tmp_path):
    """A header that declares 10^12 elements over a sparse file of that size: one message naming both."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip(
            "with overcommit always on, the allocation would succeed and the read would run for hours"
        )
    from qmerge.io.safetensors import PlannedTensor, header_bytes

    adapter = clean / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    big = next(k for k in sorted(tensors) if "lora_A" in k)
    entries = [
        PlannedTensor(k, "F32", (8, 125_000_000_000) if k == big else tuple(v.shape))
        for k, v in tensors.items()
    ]
    head = header_bytes(entries)
    path = adapter / "adapter_model.safetensors"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(e.nbytes for e in entries))
    try:
        r = run(["inspect", adapter])
        assert_refused(
            r, 1, rf"adapter_model.safetensors: tensor '{big}' is \[\d+, \d+\] F32 \([0-9,.]+ GiB\)"
        )
    finally:
        path.unlink()


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    from qmerge.data import read_jsonl

    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "hello"}).encode() + b"\n")
    assert read_jsonl(data) == [{"text": "hello"}]


def test_provenance_holds_no_local_paths(clean, tmp_path):
    out = tmp_path / "m"
    assert run(merge_args(clean, out)).exit_code == 0
    text = (out / "qmerge_provenance.json").read_text()
    assert str(tmp_path) not in text and "/in/" not in text
    prov = json.loads(text)
    assert prov["inputs"]["base"]["name"] == "base4" and prov["inputs"]["adapter"]["name"] == "adapter"
    assert prov["inputs"]["adapter"]["base_model_name_or_path"] == "../base16"


def test_provenance_names_the_hub_id_and_revision_of_a_cached_base(clean, tmp_path):
    snap = tmp_path / "hub" / "models--acme--micro-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(clean / "base4", snap)
    out = tmp_path / "m"
    assert run(["merge", clean / "adapter", "--base", snap, "-o", out]).exit_code == 0
    base = json.loads((out / "qmerge_provenance.json").read_text())["inputs"]["base"]
    assert base["hub_id"] == "acme/micro-llama" and base["revision"] == "a" * 40


# ---- --json errors and the Python API -----------------------------------------------------------------------


def test_json_errors_are_json_on_stdout(clean, tmp_path):
    r = run(["merge", tmp_path / "nowhere", "-o", tmp_path / "m", "--json"])
    assert (
        r.exit_code == 1
        and json.loads(r.stdout)["exit_code"] == 1
        and "nowhere" in json.loads(r.stdout)["error"]
    )
    r = run(merge_args(clean, tmp_path / "m", "base4", "--json", "--dtype", "fp8"))
    assert r.exit_code == 2 and json.loads(r.stdout)["exit_code"] == 2
    r = run(["inspect", tmp_path / "nowhere"])
    assert r.exit_code == 1 and r.stdout == ""  # without --json, stdout stays empty


@pytest.mark.parametrize(
    "kw,pattern",
    [
        ({"thresholds": None, "max_kl": float("nan")}, "max_kl must be a finite number"),
        ({"thresholds": None, "min_top1": 1.5}, "min_top1 must be a finite number between 0 and 1"),
        ({"seq_len": 1}, "seq_len must be a whole number between 2 and 8192"),
        ({"device": "tpu"}, "device must be one of"),
        ({"generate": 4}, "generate needs data"),
        ({"merge_base": "nf4"}, "merge_base must be one of"),
    ],
)
def test_the_api_validates_what_the_cli_validates(clean, kw, pattern):
    from qmerge.api import check
    from qmerge.verify.metrics import Thresholds

    kw = dict(kw)
    if "thresholds" in kw:
        kw.pop("thresholds")
        with pytest.raises(OptionError, match=pattern):
            Thresholds(**kw)
        return
    with pytest.raises(OptionError, match=pattern):
        check(clean / "adapter", clean / "base16", clean / "base16", **kw)


def test_the_api_refuses_a_bad_dtype_as_a_qmerge_error(clean, tmp_path):
    from qmerge.api import merge

    with pytest.raises(QmergeError, match="dtype must be one of bf16, fp16, fp32, got 'fp8'"):
        merge(clean / "adapter", tmp_path / "m", clean / "base4", dtype="fp8")
    assert not (tmp_path / "m").exists()


# ---- interrupts and children ------------------------------------------------------------------------------------


def test_ctrl_c_at_any_moment_of_start_up(clean, tmp_path):
    """SIGINT from the moment qmerge's entry point runs: exit 130 and one message, never an abort, a traceback,
    or an error about the inputs (an interrupt inside an import surfaced as "transformers rejects this
    config"). The delays count from that moment, not from Python's own start-up, which is not qmerge's."""
    argv = [str(a) for a in merge_args(clean, tmp_path / "m", "base16")]
    script = (
        "import sys; sys.stderr.write('started\\n'); sys.stderr.flush(); "
        f"sys.argv = ['qmerge', *{argv!r}]; from qmerge.__main__ import main; main()"
    )
    for delay in (0.05, 0.1, 0.25, 0.4, 0.6, 0.9, 1.3, 1.8):
        shutil.rmtree(tmp_path / "m", ignore_errors=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stderr.readline() == b"started\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        text = err.decode("utf-8", "replace")
        if proc.returncode == 0:
            continue  # finished first
        assert proc.returncode == 130, (delay, text)
        assert "interrupted; nothing was written" in text and "Traceback" not in text, (delay, text)
        assert "terminate called" not in text and "config" not in text, (delay, text)


def test_the_entry_point_imports_nothing_before_it_takes_signals():
    """The window in which Ctrl-C is Python's traceback is the entry point's own import: `qmerge` imports its
    verbs on first use, so `qmerge.__main__` loads no library (it once imported the API first: 30 ms here,
    more on a loaded machine, and an interrupt in it was a traceback)."""
    script = (
        "import sys; before = set(sys.modules); import qmerge.__main__; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["qmerge", "qmerge.__main__"], out


def test_a_child_dies_with_its_parent(tmp_path):
    """qmerge's children (llama.cpp's quantizer, the background check) end when qmerge is killed with SIGKILL."""
    script = (
        "import subprocess, sys, time\n"
        "from qmerge.children import child_env\n"
        "c = subprocess.Popen([sys.executable, '-c', 'from qmerge.children import die_with_parent; "
        "die_with_parent(); import time; time.sleep(60)'], env=child_env())\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _running(child):
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_the_quantizer_child_is_started_to_die_with_its_parent(tmp_path, monkeypatch):
    import qmerge.llama_cpp as lc
    from qmerge.children import PARENT_ENV

    seen = {}

    class Done(Exception):
        pass

    def popen(cmd, **kw):
        seen.update(kw)
        raise Done

    monkeypatch.setattr(lc.subprocess, "Popen", popen)
    with pytest.raises(Done):
        lc.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "q4_k_m")
    assert seen["env"][PARENT_ENV] == str(os.getpid())


# ---- the commit protocol under interference (hypothesis) ---------------------------------------------------


def _interfere(kind: str, target: Path) -> None:
    """What another process does to OUT between the write and the rename."""
    if kind == "file-appears":
        target.write_text("theirs")
    elif kind == "dir-appears":
        target.mkdir()
        (target / "notes.txt").write_text("theirs")
    elif kind == "replaced":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.write_text("theirs")
    elif kind == "written-into":
        (target / "notes.txt").write_text("theirs")
    elif kind == "removed":
        shutil.rmtree(target)


def _snapshot(p: Path) -> object:
    if not os.path.lexists(p):
        return None
    if p.is_dir():
        return {q.name: q.read_text() for q in sorted(p.iterdir())}
    return p.read_text()


@pytest.mark.parametrize("renameat2", [True, False])
def test_commit_protocol_under_interference(tmp_path_factory, renameat2):
    """Whatever another process does to OUT during a run, the run either puts its output at OUT (where
    OUT is absent, or still the output --force may replace) or fails and leaves what the other process made
    exactly as it made it; never a temporary left behind."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    def owned(p: Path) -> str | None:  # a qmerge output here: a directory holding only "ours"
        return None if p.is_dir() and sorted(q.name for q in p.iterdir()) == ["ours"] else "not ours"

    @settings(max_examples=60, deadline=None)
    @given(
        start=st.sampled_from(["absent", "ours"]),
        interference=st.sampled_from(
            ["none", "file-appears", "dir-appears", "replaced", "written-into", "removed"]
        ),
    )
    def prop(start, interference):
        root = tmp_path_factory.mktemp("commit")
        out = root / "m"
        if start == "ours":
            out.mkdir()
            (out / "ours").write_text("old")
        applicable = {
            "absent": ("none", "file-appears", "dir-appears"),
            "ours": ("none", "replaced", "written-into", "removed"),
        }[start]
        kind = interference if interference in applicable else "none"
        commit.before_commit[:] = [lambda tmp, target: _interfere(kind, target)]
        after = None
        try:
            with atomic.atomic_dir(out, force=True, owned=owned) as tmp:
                (tmp / "ours").write_text("new")
        except OutputError as e:
            assert "appeared during the run" in str(e)
            assert kind in ("file-appears", "dir-appears", "replaced", "written-into")
            after = _snapshot(out)
            assert after != {"ours": "new"}
        else:
            assert kind in ("none", "removed")
            assert _snapshot(out) == {"ours": "new"}
        finally:
            commit.before_commit[:] = []
        if after is not None and kind in ("file-appears", "replaced"):
            assert after == "theirs"
        if after is not None and kind in ("dir-appears", "written-into"):
            assert after.get("notes.txt") == "theirs"
        assert [p.name for p in root.iterdir() if ".qmerge-" in p.name] == []

    if not renameat2:
        real = commit._rename2
        commit._rename2 = lambda *a: False
    try:
        prop()
    finally:
        if not renameat2:
            commit._rename2 = real


def test_target_modules_named_as_peft_documents_need_no_peft_import(clean):
    """A 4-bit merge never imports transformers in its own process, and its background child imports PEFT
    (seconds) only when target_modules do not plainly name a module the adapter holds."""
    code = (
        "import sys; from pathlib import Path; from qmerge.io.adapter import Adapter, selects_none; "
        f"assert not selects_none(Adapter(Path({str(clean / 'adapter')!r}))); "
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_provenance_of_a_16bit_base_merge_holds_no_local_paths(tmp_path):
    adapter = tmp_path / "run" / "checkpoint-12"
    shutil.copytree(FIXTURES / "adapter-qlora" / "checkpoint-12", adapter)
    out = tmp_path / "m"
    assert run(["merge", adapter, "--base", FIXTURES / "tiny-llama-bf16", "-o", out]).exit_code == 0
    text = (out / "qmerge_provenance.json").read_text()
    assert str(tmp_path) not in text and str(FIXTURES) not in text, text
