"""Golden bytes: every merge/export output of the fixtures (and of a few bases and adapters made here by
transformers and PEFT) hashes to what tests/golden_hashes.json recorded. Refactors keep every byte.

The outputs are made through the command line, as users make them, in one child process under MKL's
reproducible mode (see _REPRODUCIBLE). qmerge_provenance.json is left out (it records input names). After an
intended change of output bytes, regenerate the file with `python -m tests.test_golden --write` and say why
in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GOLDEN = Path(__file__).resolve().parent / "golden_hashes.json"
ADAPTERS = ("adapter-qlora", "adapter-rslora-patterns", "adapter-dora")
B16, B4 = "tiny-llama-bf16", "tiny-llama-nf4"


def _cases() -> dict[str, tuple[str, ...]]:
    """name -> CLI arguments, with {f}/ for the fixtures, {b}/ for bases built here, {o} for the output."""
    cases: dict[str, tuple[str, ...]] = {}
    for a in ADAPTERS:
        src = (f"{{f}}/{a}", "--base", f"{{f}}/{B16}")
        cases[f"{a}/merge-bf16"] = ("merge", *src, "-o", "{o}")
        cases[f"{a}/merge-fp32"] = ("merge", *src, "-o", "{o}", "--dtype", "fp32")
        cases[f"{a}/export-fp16"] = ("export", *src, "--to", "fp16", "-o", "{o}")
        cases[f"{a}/export-nf4"] = ("export", *src, "--to", "nf4", "-o", "{o}")
        for t in ("f32", "f16", "bf16", "q8_0", "q4_k_m"):
            cases[f"{a}/gguf-{t}"] = ("export", *src, "--to", "gguf", "--gguf-type", t, "-o", "{o}.gguf")
    q = ("{f}/adapter-qlora",)
    cases.update(
        {
            "qlora/base4-merge-bf16": ("merge", *q, "--base", f"{{f}}/{B4}", "-o", "{o}"),
            "qlora/base4-gguf-f16": ("export", *q, "--base", f"{{f}}/{B4}", "--to", "gguf", "-o", "{o}.gguf"),
            "qlora/original-merge-bf16": (
                *("merge", *q, "--base", f"{{f}}/{B16}", "-o", "{o}", "--merge-base", "original"),
            ),
            "qlora/sharded-fp32": (
                *("merge", *q, "--base", f"{{f}}/{B16}", "-o", "{o}", "--dtype", "fp32"),
                *("--max-shard-size", "60KB"),
            ),
            "qlora/nf4-128-plain-fp32": (
                *("export", *q, "--base", f"{{f}}/{B16}", "--to", "nf4", "-o", "{o}"),
                *("--nf4-blocksize", "128", "--nf4-no-double-quant", "--nf4-compute-dtype", "fp32"),
            ),
            "qlora/nf4-sharded": (
                *("export", *q, "--base", f"{{f}}/{B16}", "--to", "nf4", "-o", "{o}"),
                *("--max-shard-size", "40KB"),
            ),
            "qlora/gguf-q6_k": (
                *("export", *q, "--base", f"{{f}}/{B16}", "--to", "gguf", "--gguf-type", "q6_k"),
                *("-o", "{o}.gguf"),
            ),
            "qlora/fp4-16bit-base": (
                *("merge", *q, "--base", f"{{f}}/{B16}", "-o", "{o}", "--quant-type", "fp4"),
                *("--no-double-quant", "--blocksize", "128", "--quant-dtype", "fp16"),
            ),
            "base4/export-bf16": ("export", f"{{f}}/{B4}", "--to", "bf16", "-o", "{o}"),
            "base4/export-nf4": ("export", f"{{f}}/{B4}", "--to", "nf4", "-o", "{o}"),
            "base16/gguf-q8_0": (
                "export",
                f"{{f}}/{B16}",
                "--to",
                "gguf",
                "--gguf-type",
                "q8_0",
                "-o",
                "{o}.gguf",
            ),
        }
    )
    for b in ("tied", "gpt2", "emb", "bias"):
        src = (f"{{b}}/{b}/adapter", "--base", f"{{b}}/{b}/base")
        cases[f"{b}/merge-fp32"] = ("merge", *src, "-o", "{o}", "--dtype", "fp32")
        cases[f"{b}/export-nf4"] = ("export", *src, "--to", "nf4", "-o", "{o}")
    cases["tied/gguf-f16"] = (
        "export",
        "{b}/tied/adapter",
        "--base",
        "{b}/tied/base",
        "--to",
        "gguf",
        "-o",
        "{o}.gguf",
    )
    cases["gpt2/base4-merge-bf16"] = ("merge", "{b}/gpt2/adapter", "--base", "{b}/gpt2/base4", "-o", "{o}")
    return cases


def build_bases(root: Path) -> None:
    """Bases and adapters made by transformers and PEFT with fixed seeds: a tied Qwen2 whose lm_head the
    adapter trains (modules_to_save), GPT-2 Conv1D with fan_in_fan_out (16-bit and 4-bit base), LoRA on
    embeddings, and LoRA biases."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from qmerge.demo.tiny import TinySpec, build_base
    from tests.helpers import bnb_config, random_adapter

    base = build_base(root / "tied" / "base", TinySpec(arch="qwen2", tie_word_embeddings=True))
    random_adapter(
        base,
        root / "tied" / "adapter",
        seed=5,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=320, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(str(root / "gpt2" / "base"))
    AutoModelForCausalLM.from_pretrained(
        str(root / "gpt2" / "base"), quantization_config=bnb_config(torch.bfloat16), device_map="cpu"
    ).save_pretrained(str(root / "gpt2" / "base4"))
    random_adapter(
        root / "gpt2" / "base",
        root / "gpt2" / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    emb = build_base(root / "emb" / "base", TinySpec(arch="llama", seed=3))
    random_adapter(
        emb, root / "emb" / "adapter", seed=3, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]
    )
    bias = build_base(root / "bias" / "base", TinySpec(arch="qwen2", seed=4))
    random_adapter(
        bias,
        root / "bias" / "adapter",
        seed=4,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_bias=True,
    )


def _digests(out: Path) -> dict[str, str]:
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    return {
        ("<file>" if out.is_file() else str(p.relative_to(out))): hashlib.sha256(p.read_bytes()).hexdigest()[
            :16
        ]
        for p in files
        if p.name != "qmerge_provenance.json"
    }


def run_case(args: tuple[str, ...], built: Path, out: Path) -> dict[str, str]:
    from click.testing import CliRunner

    from qmerge.cli import cli

    argv = [a.format(f=FIXTURES, b=built, o=out) for a in args] + ["--json"]
    r = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    written = Path(json.loads(r.stdout)["output"])
    return _digests(written)


# MKL picks its fp32 GEMM kernel by CPU (AVX2, AVX-512, another vendor's), and each sums the r products of
# B @ A in its own order: the merged bytes of a LoRA layer differ between machines by an ulp here and there
# (measured: the rsLoRA fixture gave three hashes on one machine under MKL's AVX2, AVX-512 and COMPATIBLE
# modes). MKL's conditional numerical reproducibility mode COMPATIBLE computes the same on every x86 CPU, so
# the cases run in one child process under it: the hashes pin qmerge's code, not the machine's kernels.
_REPRODUCIBLE = {"MKL_CBWR": "COMPATIBLE"}


def digests_in_child() -> dict[str, dict[str, str]]:
    """{case: its digests}, every case run in one child process under _REPRODUCIBLE."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "tests.test_golden", "--print"],
        cwd=root,
        env={**os.environ, **_REPRODUCIBLE},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _run_all() -> dict[str, dict[str, str]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_bases(Path(tmp) / "built")
        return {
            name: run_case(args, Path(tmp) / "built", Path(tmp) / name.replace("/", "_"))
            for name, args in sorted(_cases().items())
        }


@pytest.fixture(scope="module")
def produced() -> dict[str, dict[str, str]]:
    return digests_in_child()


@pytest.mark.parametrize("case", sorted(_cases()))
def test_output_bytes_are_unchanged(case, produced):
    golden = json.loads(GOLDEN.read_text())
    assert produced[case] == golden[case], case


if __name__ == "__main__" and "--print" in sys.argv:  # the child of digests_in_child
    print(json.dumps(_run_all()))
elif __name__ == "__main__" and "--write" in sys.argv:
    result = digests_in_child()
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(result)} cases to {GOLDEN}")
