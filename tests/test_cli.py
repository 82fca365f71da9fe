"""The command line as users and CI run it: contract JSON keys, exit codes, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qmerge.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    "target",
    ["tiny-llama-bf16", "tiny-llama-nf4", "adapter-qlora", "adapter-dora", "adapter-qlora/checkpoint-12"],
)
def test_inspect_json_has_contract_keys(fixtures, target):
    r = run("inspect", fixtures / target, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert {"architecture", "num_parameters", "quantization", "adapter", "modules", "problems"} <= info.keys()
    for m in info["modules"]:
        assert {"name", "shape", "quantized", "lora_rank", "scaling"} <= m.keys()


def test_inspect_human_output(fixtures):
    r = run("inspect", fixtures / "adapter-rslora-patterns")
    assert r.exit_code == 0 and "rsLoRA=True" in r.stdout and "no problems found" in r.stdout


def test_merge_then_check_pass_and_fail(tmp_path, fixtures, base16):
    r = run("merge", fixtures / "adapter-qlora", "--base", base16, "-o", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert {"output", "files", "num_tensors_merged", "seconds"} <= summary.keys()
    assert all({"path", "bytes", "sha256"} <= f.keys() for f in summary["files"])
    r = run("check", fixtures / "adapter-qlora", "--base", base16, "--candidate", tmp_path / "m", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (
        rep["passed"]
        and {
            "max_abs_logit_diff",
            "mean_kl",
            "max_kl",
            "top1_agreement",
            "ppl_reference",
            "ppl_candidate",
            "n_tokens",
        }
        <= rep["metrics"].keys()
    )
    assert {"thresholds", "candidate"} <= rep.keys()
    # the base itself is a candidate that lost the fine-tune: a strict gate must exit 3
    r = run("check", fixtures / "adapter-qlora", "--candidate", base16, "--max-abs-diff", "1e-6", "--json")
    assert r.exit_code == 3 and json.loads(r.stdout)["passed"] is False


def test_check_text_file_and_naive(tmp_path, fixtures, base16):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    run("merge", fixtures / "adapter-dora", "--base", base16, "-o", tmp_path / "m", "--dtype", "fp32")
    r = run(
        "check",
        fixtures / "adapter-dora",
        "--base",
        base16,
        "--candidate",
        tmp_path / "m",
        "--text",
        text,
        "--naive",
        "--seq-len",
        "32",
        "--json",
    )
    rep = json.loads(r.stdout)
    assert r.exit_code == 0 and rep["metrics"]["max_abs_logit_diff"] < 1e-4
    assert rep["naive_merge"]["max_abs_logit_diff"] > 10 * rep["metrics"]["max_abs_logit_diff"]


@pytest.mark.parametrize(
    "make_bad,expected",
    [
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20), "corrupt"),
        (lambda d: (d / "adapter_config.json").write_text("{oops"), "not valid JSON"),
        (lambda d: (d / "adapter_config.json").unlink(), "holds trainer checkpoints"),
    ],
)
def test_bad_input_exits_1_with_one_message(tmp_path, fixtures, base16, make_bad, expected):
    d = tmp_path / "a"
    shutil.copytree(fixtures / "adapter-qlora", d)
    make_bad(d)
    r = run("merge", d, "--base", base16, "-o", tmp_path / "m")
    assert r.exit_code == 1
    assert expected in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "m").exists()


def test_missing_config_and_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("inspect", tmp_path / "empty")
    assert r.exit_code == 1 and "not a PEFT adapter" in r.stderr
    f = tmp_path / "x.bin"
    f.write_bytes(b"junk")
    r = run("inspect", f)
    assert r.exit_code == 1 and "x.bin" in r.stderr
    (tmp_path / "named" / "my-task").mkdir(parents=True)  # PEFT's folder for an adapter not named "default"
    (tmp_path / "named" / "my-task" / "adapter_config.json").write_text("{}")
    r = run("inspect", tmp_path / "named")
    assert r.exit_code == 1 and "folders of their own (my-task)" in r.stderr


def test_usage_error_exits_2(fixtures):
    assert run("merge", fixtures / "adapter-qlora").exit_code == 2
    assert run("export", fixtures / "adapter-qlora", "--to", "onnx", "-o", "x").exit_code == 2


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "qmerge.cli", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("inspect", "merge", "check", "export", "train", "demo"):
        assert cmd in out.stdout


def test_docs_cli_lists_every_option():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for name, cmd in cli.commands.items():
        assert f"## qmerge {name}" in doc
        for param in cmd.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in doc, f"{name} {opt} missing from docs/cli.md"


TORCH_FREE = [
    ["--help"],
    ["-V"],
    ["--version"],
    ["merge", "--help"],
    ["export", "--help"],
    ["check", "--help"],
    ["merge", "ADAPTER"],  # no -o: click's usage error
    ["export", "SRC", "--to", "onnx", "-o", "x"],  # not a format
    ["check", "ADAPTER", "--candidate", "C", "--generate", "3"],  # --generate without --data
    ["check", "ADAPTER", "--candidate", "C", "--probe-quant", "warn", "--quant-type", "fp4"],
]


@pytest.mark.parametrize("args", TORCH_FREE, ids=" ".join)
def test_help_version_and_usage_errors_do_not_import_torch(args):
    """They answer at once: torch (seconds to import) is not loaded on the way (benchmarks/cli_bench.py)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['qmerge', *{args!r}]\n"
        "try:\n    runpy.run_module('qmerge', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH"), r.stderr
    assert last.split()[1] in ("0", "2", "None"), r.stderr


def test_version_flag():
    r = CliRunner().invoke(cli, ["-V"])
    assert r.exit_code == 0 and r.output.startswith("qmerge, version ")


def test_the_choices_are_the_libraries():
    """The torch-free names the CLI offers are the ones the library acts on."""
    import gguf

    from qmerge import dtypes, names
    from qmerge.api import EXPORT_FORMATS
    from qmerge.pipeline import source

    assert (
        tuple(dtypes.OPTIONS) == names.DTYPES
        and (*names.DTYPES, "nf4", "gguf", "gguf-lora") == EXPORT_FORMATS
    )
    assert source.MERGE_BASES == names.MERGE_BASES
    for name in names.GGUF_TENSOR_TYPES:  # each one a GGML type gguf-py knows
        assert name.upper() in gguf.GGMLQuantizationType.__members__


def test_the_python_api_is_typed_and_documented(tmp_path, fixtures, base16):
    """help(qmerge) shows the verbs with their keywords; thresholds are keywords of check; an unknown keyword
    is Python's TypeError; an export's option conflict names keywords, not command-line options."""
    import pydoc

    import qmerge
    from qmerge.errors import UnsupportedError

    text = pydoc.render_doc(qmerge, renderer=pydoc.plaintext)
    for verb in ("merge(", "export(", "check(", "describe("):
        assert verb in text, text[:2000]
    assert "max_kl" in text and "allow_other_base" in text
    merged = tmp_path / "m"
    qmerge.merge(fixtures / "adapter-qlora", merged, base16, dtype="fp32")
    report = qmerge.check(fixtures / "adapter-qlora", merged, base16, max_kl=1e-6, min_top1=1.0, max_seqs=1)
    assert report.passed and report.thresholds.max_kl == 1e-6
    assert not qmerge.check(fixtures / "adapter-qlora", base16, base16, max_kl=0.0, max_seqs=1).passed
    with pytest.raises(TypeError):
        qmerge.check(fixtures / "adapter-qlora", merged, bogus=1)
    with pytest.raises(UnsupportedError, match=r"^imatrix writes .* use it with to gguf and calibrate\.$"):
        qmerge.export(fixtures / "adapter-qlora", "fp16", tmp_path / "x", imatrix=tmp_path / "i.gguf")
    assert qmerge.describe(fixtures / "adapter-qlora").to_json()["adapter"]["r"] > 0
    import inspect

    import qmerge.description  # noqa: F401 - a submodule never shadows a verb of the same name

    for verb in (qmerge.merge, qmerge.export, qmerge.check, qmerge.describe):
        assert inspect.isfunction(verb), verb


def test_held_out_prompts_without_answers_serve_generate(tmp_path, fixtures, base16):
    """Chat records that end in a user turn are prompts: --generate completes them (with the whole
    conversation as the prompt); the drift, with nothing to score in them, is measured on text."""
    from tests.test_hostile import run

    merged = tmp_path / "m"
    assert run(["merge", fixtures / "adapter-qlora", "-o", merged]).exit_code == 0
    user, assistant = {"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}
    rows = [{"messages": [user]}, {"messages": [{"role": "system", "content": "be brief"}, user]}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["check", fixtures / "adapter-qlora", "--candidate", merged, "--data", data]
    html = tmp_path / "check.html"
    r = run([*args, "--generate", "2", "--max-new-tokens", "4", "--json", "--report", html])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["task"]["prompts"] == 2 and report["task"]["accuracy_reference"] is None
    # completions that agree are shown too, beside those that differ (bf16 rounding may flip one)
    agreeing, differing = report["task"]["agreeing"], report["task"]["differing"]
    assert agreeing and len(agreeing) + len(differing) == 2
    assert f"completions that agree ({len(agreeing)} of {len(agreeing)})" in html.read_text()
    assert any("holds prompts without answers" in w for w in report["warnings"]) and "data" not in report
    r = run(args)
    assert r.exit_code == 1 and "no record has response tokens to compare the models on" in r.stderr
    # a conversation that goes on after an answer: its answers are scored, its last user turn completed
    data.write_text(json.dumps({"messages": [user, assistant, {"role": "user", "content": "four"}]}) + "\n")
    r = run([*args, "--generate", "1", "--max-new-tokens", "4", "--json"])
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["task"]["prompts"] == 1 and report["data"] == str(data), r.output


def test_progress_goes_to_a_terminal_stderr_with_json_too(tmp_path, fixtures, monkeypatch):
    """merge --json on a terminal: stdout holds the JSON alone, the bar goes to stderr."""
    import io

    from rich.console import Console

    import qmerge.cli as cli_module

    screen = io.StringIO()
    monkeypatch.setattr(cli_module, "err", Console(file=screen, force_terminal=True, width=100))
    r = CliRunner().invoke(
        cli, ["merge", str(fixtures / "adapter-qlora"), "-o", str(tmp_path / "m"), "--json"]
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["num_tensors_merged"] > 0
    assert "merging" in screen.getvalue()
