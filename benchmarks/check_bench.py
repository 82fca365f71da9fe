"""`qmerge check` speed and peak memory against the full-load route, in one run.

Builds the synthetic Llama-shaped model of merge_bench.py (bf16 base, its bitsandbytes 4-bit form, a
rank-16 all-linear adapter), merges it to bf16 as the candidate, then runs each route in a fresh process on
the same tokens (4 sequences of 128 seeded random ids: the models have no tokenizer) and records wall time
and peak RSS (VmHWM):

  qmerge (4-bit base)      qmerge check ADAPTER --base BASE4 --candidate MERGED (both models streamed)
  qmerge (16-bit base)     the same from the 16-bit base (training's NF4 reproduced by qmerge's codec)
  full load (4-bit base)   what check did before: transformers + bitsandbytes load the 4-bit base whole,
                           model.dequantize().float(), PEFT on top; the candidate loaded whole in fp32
  full load (16-bit base)  the same with bitsandbytes quantizing the 16-bit base at load time

Usage: python benchmarks/check_bench.py [--size 1.1b|0.3b|7b|tiny] [--routes all|qmerge] [--cache cold|warm]
                                        [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_bench import SHAPES, build, peak_rss_gib, settle  # noqa: E402

SEQS, SEQ_LEN = 4, 128
TOKENS = f"torch.randint(0, VOCAB, ({SEQS}, {SEQ_LEN}), generator=torch.Generator().manual_seed(0))"
CHILDREN = {
    "qmerge": (
        "from qmerge.verify.check import check; from qmerge.verify.metrics import Thresholds\n"
        "M = check(ADAPTER, CAND, base=BASE, thresholds=Thresholds(None, None, None), device='cpu').metrics"
    ),
    "full": (
        "from peft import PeftModel; from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
        "from qmerge.verify.metrics import compare_logits\n"
        "kw = {} if (BASE / 'config.json').read_text().count('quantization_config') else {'quantization_config':"
        " BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,"
        " bnb_4bit_compute_dtype=torch.float32), 'dtype': 'auto'}\n"
        "m = AutoModelForCausalLM.from_pretrained(str(BASE), device_map='cpu', **kw).dequantize().float()\n"
        "m = PeftModel.from_pretrained(m, str(ADAPTER)).eval()\n"
        f"VOCAB = m.get_input_embeddings().weight.shape[0]; T = {TOKENS}\n"
        "with torch.no_grad(): R = torch.cat([m(input_ids=T[i:i+1]).logits.float() for i in range(len(T))])\n"
        "del m\n"
        "c = AutoModelForCausalLM.from_pretrained(str(CAND), dtype=torch.float32).eval()\n"
        "with torch.no_grad(): C = torch.cat([c(input_ids=T[i:i+1]).logits.float() for i in range(len(T))])\n"
        "M = compare_logits(R, C, T)"
    ),
}


def child(kind: str, adapter: str, base: str, cand: str) -> None:
    """Run one route in this (fresh) process; print its time, peak RSS and metrics as JSON."""
    import dataclasses

    import torch

    start = time.perf_counter()
    env = {"ADAPTER": Path(adapter), "BASE": Path(base), "CAND": Path(cand), "torch": torch}
    error, metrics = None, None
    try:
        exec(CHILDREN[kind], env)
        metrics = dataclasses.asdict(env["M"])
    except Exception as e:  # noqa: BLE001 - a failing route is a result, not a crash
        error = f"{type(e).__name__}: {str(e)[:300]}"
    out = {
        "seconds": time.perf_counter() - start,
        "max_rss_gib": peak_rss_gib(),
        "error": error,
        "metrics": metrics,
    }
    print(json.dumps(out))


def run_route(kind: str, adapter: Path, base: Path, cand: Path, cache: str) -> dict:
    settle([adapter, base, cand], cache)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(adapter), str(base), str(cand)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-600:], "wall_seconds": wall}
    return {**json.loads(lines[-1]), "wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--routes", choices=["all", "qmerge"], default="all", help="qmerge: skip the full-load routes"
    )
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "ADAPTER", "BASE", "CAND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="qmerge-check-bench-", dir=args.workdir))
    try:
        from qmerge.api import merge

        t = time.perf_counter()
        base16, base4, adapter, n = build(work, args.size)
        merge(adapter, work / "merged", base=base4, dtype="bf16")
        print(
            f"built {n / 1e9:.2f}B-parameter model and its merge in {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        routes = {
            "qmerge (4-bit base)": ("qmerge", base4),
            "qmerge (16-bit base)": ("qmerge", base16),
            "full load (4-bit base)": ("full", base4),
            "full load (16-bit base)": ("full", base16),
        }
        if args.routes == "qmerge":
            routes = {k: v for k, v in routes.items() if v[0] == "qmerge"}
        results = {}
        for label, (kind, base) in routes.items():
            results[label] = run_route(kind, adapter, base, work / "merged", args.cache)
            print(label, json.dumps(results[label]), file=sys.stderr)
        summary = {
            "size": args.size,
            "parameters": n,
            "tokens": SEQS * SEQ_LEN,
            "cache": args.cache,
            "routes": results,
        }
        for b in ("4-bit", "16-bit"):
            q, f = results.get(f"qmerge ({b} base)", {}), results.get(f"full load ({b} base)", {})
            if "seconds" in q and "seconds" in f and not f.get("error"):
                summary[f"speedup_{b}"] = f["wall_seconds"] / q["wall_seconds"]
                summary[f"rss_ratio_{b}"] = f["max_rss_gib"] / q["max_rss_gib"]
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
