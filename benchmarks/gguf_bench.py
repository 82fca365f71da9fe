"""GGUF export: `qmerge export --to gguf` from the QLoRA checkpoint against the route users take today
(PEFT merge into a bf16 directory, then llama.cpp's convert_hf_to_gguf.py), in one run.

Each step runs in a fresh process that reports its own wall time and peak RSS (VmHWM). llama.cpp's
converter is not a Python package: pass its path with --converter (it is in the llama.cpp repository and
in llama-cpp-python's source distribution, under vendor/llama.cpp). Without it, only qmerge is measured.
The synthetic model gets a small SentencePiece tokenizer (the converter rejects BPE tokenizers whose
pre-tokenizer it does not recognise).

Usage: python benchmarks/gguf_bench.py [--size 1.1b|0.3b|tiny] [--converter PATH] [--cache cold|warm]
                                       [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build, run_route, settle  # noqa: E402

_WRAP = """
import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    if target.endswith(".py"):
        sys.path.insert(0, target.rsplit("/", 1)[0])  # as `python script.py` would
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]  # ru_maxrss survives exec
print("BENCH_RSS_GIB", int(hwm[0].split()[1]) / 2**20, file=sys.stderr)
sys.exit(code)
"""


def timed(inputs: list[Path], cache: str, target: str, *args: str) -> dict:
    """Run a script (path) or module in a fresh process: wall time and that process's own peak RSS.
    `inputs` are first dropped from the page cache or read into it (see merge_bench.settle)."""
    settle(inputs, cache)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, target, *args], capture_output=True, text=True)
    res = {"wall_seconds": time.perf_counter() - t, "returncode": p.returncode}
    for line in p.stderr.splitlines():
        if line.startswith("BENCH_RSS_GIB "):
            res["max_rss_gib"] = float(line.split()[1])
    if p.returncode:
        res["error"] = (p.stderr or p.stdout)[-400:]
    return res


def add_sentencepiece(*dirs: Path) -> None:
    """A small SentencePiece tokenizer.model (qmerge's built-in corpus) in each of dirs."""
    from qmerge.demo.tiny import build_sentencepiece

    for d in dirs:
        build_sentencepiece(Path(d) / "tokenizer.model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--converter", type=Path, default=None, help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold", help="as in merge_bench.py")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmerge-gguf-bench-", dir=args.workdir))
    try:
        base16, base4, adapter, n = build(work, args.size)
        add_sentencepiece(base16, base4)
        q = timed(
            [adapter, base4],
            args.cache,
            "qmerge.cli",
            "export",
            str(adapter),
            "--base",
            str(base4),
            "--to",
            "gguf",
            "--gguf-type",
            "f16",
            "-o",
            str(work / "qmerge.gguf"),
            "--json",
        )
        result: dict = {"size": args.size, "parameters": n, "cache": args.cache, "qmerge_export_f16": q}
        if args.converter:
            merged = work / "merged-bf16"
            step1 = run_route(
                "peft16", adapter, base16, work / "peft-out", args.cache
            )  # timed; its output is removed
            # the converter needs a merged directory: make the same one (untimed) with qmerge
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "qmerge.cli",
                    "merge",
                    str(adapter),
                    "--base",
                    str(base16),
                    "-o",
                    str(merged),
                    "--merge-base",
                    "original",
                ],
                check=True,
                capture_output=True,
            )
            step2 = timed(
                [merged],
                args.cache,
                str(args.converter),
                str(merged),
                "--outtype",
                "f16",
                "--outfile",
                str(work / "llamacpp.gguf"),
            )
            result["peer"] = {"peft_merge_to_bf16": step1, "convert_hf_to_gguf_f16": step2}
            if "error" not in step2 and step1.get("error") is None:
                result["peer_total_seconds"] = step1["wall_seconds"] + step2["wall_seconds"]
                result["speedup"] = result["peer_total_seconds"] / q["wall_seconds"]
                result["peer_peak_rss_gib"] = max(step1["max_rss_gib"], step2.get("max_rss_gib", 0.0))
                result["gguf_bytes"] = {
                    "qmerge": (work / "qmerge.gguf").stat().st_size,
                    "llama.cpp": (work / "llamacpp.gguf").stat().st_size,
                }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
