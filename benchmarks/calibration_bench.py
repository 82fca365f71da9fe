"""What calibration costs: `qmerge export --calibrate` against the plain export of the same format, in one run.

Builds the synthetic Llama-shaped model of merge_bench.py (4-bit base and a rank-16 all-linear adapter; the
tiny fixture's tokenizer copied beside it, since the synthetic model has none) and a calibration text, then
runs each route in a fresh process (inputs dropped from the page cache first) and records wall time and peak
RSS (VmHWM):

  nf4                 qmerge export --to nf4                            (plain rounding: the peer)
  nf4 calibrated      qmerge export --to nf4 --calibrate TEXT           (GPTQ, bitsandbytes' scales)
  iq4_nl calibrated   qmerge export --to gguf --gguf-type iq4_nl --calibrate TEXT
  q4_k_m              qmerge export --to gguf --gguf-type q4_k_m        (llama.cpp's quantizer: the peer)
  q4_k_m calibrated   qmerge export --to gguf --gguf-type q4_k_m --calibrate TEXT   (llama.cpp's file, then
                      the 4-bit layers' Q4_K/Q6_K blocks chosen again)

Usage: python benchmarks/calibration_bench.py [--size 1.1b|0.3b|tiny] [--tokens 8192]
                                              [--routes nf4|q4_k_m|all]
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

from merge_bench import SHAPES, build, peak_rss_gib, settle  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama-bf16"
CHILDREN = {
    "nf4": "R = export(ADAPTER, 'nf4', OUT, base=BASE)",
    "nf4-cal": "R = export(ADAPTER, 'nf4', OUT, base=BASE, calibrate=DATA, calibration_tokens=TOKENS)",
    "iq4-cal": (
        "OUT.mkdir(); R = export(ADAPTER, 'gguf', OUT / 'model.gguf', base=BASE, gguf_type='iq4_nl',"
        " calibrate=DATA, calibration_tokens=TOKENS)"
    ),
    "q4km": "OUT.mkdir(); R = export(ADAPTER, 'gguf', OUT / 'model.gguf', base=BASE, gguf_type='q4_k_m')",
    "q4km-cal": (
        "OUT.mkdir(); R = export(ADAPTER, 'gguf', OUT / 'model.gguf', base=BASE, gguf_type='q4_k_m',"
        " calibrate=DATA, calibration_tokens=TOKENS)"
    ),
}
ROUTES = {
    "nf4": {"nf4": "nf4", "nf4 calibrated": "nf4-cal"},
    "q4_k_m": {"q4_k_m": "q4km", "q4_k_m calibrated": "q4km-cal"},
}
ROUTES["all"] = ROUTES["nf4"] | {"iq4_nl calibrated": "iq4-cal"} | ROUTES["q4_k_m"]


def child(kind: str, adapter: str, base: str, out: str, data: str, tokens: str) -> None:
    from qmerge.api import export

    start = time.perf_counter()
    env = {"export": export, "ADAPTER": Path(adapter), "BASE": Path(base), "OUT": Path(out)}
    env |= {"DATA": Path(data), "TOKENS": int(tokens)}
    exec(CHILDREN[kind], env)
    d = env["R"].details
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "max_rss_gib": peak_rss_gib(),
                "output_error_vs_rounding": d.get("calibration", {}).get("output_error_vs_rounding"),
                "delta_kept": (d.get("delta_retention") or {}).get("total"),
                "tokens": d.get("calibration", {}).get("tokens"),
            }
        )
    )


def run(kind: str, adapter: Path, base: Path, out: Path, data: Path, tokens: int) -> dict:
    settle([adapter, base], "cold")
    t = time.perf_counter()
    args = [
        sys.executable,
        __file__,
        "--child",
        kind,
        str(adapter),
        str(base),
        str(out),
        str(data),
        str(tokens),
    ]
    p = subprocess.run(args, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-600:]}
    res = json.loads(lines[-1]) | {"wall_seconds": time.perf_counter() - t}
    res["output_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--routes", choices=sorted(ROUTES), default="all")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from qmerge.demo.tiny import CORPUS

    work = Path(tempfile.mkdtemp(prefix="qmerge-calbench-", dir=args.workdir))
    try:
        _, base4, adapter, n = build(work, args.size)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(FIXTURE / name, base4 / name)
        data = work / "calibration.txt"
        data.write_text(CORPUS * 200)
        results = {}
        for label, kind in ROUTES[args.routes].items():
            results[label] = run(kind, adapter, base4, work / "out", data, args.tokens)
            print(label, json.dumps(results[label]), file=sys.stderr)
        summary = {"size": args.size, "parameters": n, "tokens": args.tokens, "routes": results}
        for plain_label in ("nf4", "q4_k_m"):
            plain, cal = results.get(plain_label, {}), results.get(plain_label + " calibrated", {})
            if "seconds" in plain and "seconds" in cal:
                summary[f"{plain_label}_calibrated_over_plain_seconds"] = (
                    cal["wall_seconds"] / plain["wall_seconds"]
                )
                summary[f"{plain_label}_calibrated_over_plain_rss"] = (
                    cal["max_rss_gib"] / plain["max_rss_gib"]
                )
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
