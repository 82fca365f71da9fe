"""GGUF export: `qmerge export --to gguf` from the QLoRA checkpoint against the route users take today
(PEFT merge into a bf16 directory, then llama.cpp's convert_hf_to_gguf.py), in one run.

Each step runs in a fresh process; wall time and peak RSS (ru_maxrss) are recorded, and the two GGUF files
are compared in llama.cpp. llama.cpp's converter is not a Python package: pass its path with --converter
(it is in the llama.cpp repository and in llama-cpp-python's source distribution under vendor/llama.cpp).
Without it, only qmerge's route is measured.

Usage: python benchmarks/gguf_bench.py [--size 1.1b|0.3b|tiny] [--converter PATH] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build, run_route  # noqa: E402


def timed(cmd: list[str]) -> dict:
    """Run cmd in a fresh process; wall time and that process's peak RSS (via /usr/bin/env + rusage)."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = {"wall_seconds": time.perf_counter() - t, "returncode": p.returncode}
    # RUSAGE_CHILDREN keeps the largest child so far; a new maximum is this child's own peak.
    res["max_rss_gib"] = after / 2**20 if after > before else None
    if p.returncode:
        res["error"] = (p.stderr or p.stdout)[-400:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--converter", type=Path, default=None, help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmerge-gguf-bench-", dir=args.workdir))
    try:
        base16, base4, adapter, n = build(work, args.size)
        # qmerge first: its peak is then the first maximum RUSAGE_CHILDREN records
        q = timed(
            [
                sys.executable,
                "-m",
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
            ]
        )
        result = {"size": args.size, "parameters": n, "qmerge_export_f16": q}
        if args.converter:
            merged = work / "merged-bf16"
            step1 = run_route("peft16", adapter, base16, merged.with_name("tmp-out"))
            # run_route deletes its output; merge again for the converter, outside the timing
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
                [
                    sys.executable,
                    str(args.converter),
                    str(merged),
                    "--outtype",
                    "f16",
                    "--outfile",
                    str(work / "llamacpp.gguf"),
                ]
            )
            result["peer"] = {"peft_merge_to_bf16": step1, "convert_hf_to_gguf_f16": step2}
            if "wall_seconds" in step1 and step2["returncode"] == 0:
                total = step1["wall_seconds"] + step2["wall_seconds"]
                result["peer_total_seconds"] = total
                result["speedup"] = total / q["wall_seconds"]
                peaks = [x for x in (step1.get("max_rss_gib"), step2.get("max_rss_gib")) if x]
                result["peer_peak_rss_gib"] = max(peaks) if peaks else None
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
