"""NF4 requantization speed: qmerge's codec against bitsandbytes' quantize_4bit on the same tensors.

Both are run in this process on the same bf16 tensors (Llama-7B linear shapes by default) and must give
identical bytes (codes, absmax, nested absmax, offset); the ratio of their throughputs is reported. Also
the weights training saw from a 16-bit base (what merge, check and the exports do with one): qmerge's
reproduce_4bit against bitsandbytes' round trip dequantize_4bit(quantize_4bit(W)), identical values.

Usage: python benchmarks/nf4_bench.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import bitsandbytes.functional as F

    from qmerge.quant.blockwise import dequantize_4bit, quantize_4bit
    from qmerge.quant.reproduce import reproduce_4bit

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many runs (the machine is noisy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows, total = [], {"qmerge": 0.0, "bitsandbytes": 0.0, "params": 0}
    for label, shape in SHAPES.items():
        W = (torch.randn(shape, generator=g) * 0.02).bfloat16()
        p_ref, s_ref = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        p, s = quantize_4bit(W, 64, "nf4", True)
        identical = (
            torch.equal(p, p_ref)
            and torch.equal(s.absmax, s_ref.absmax)
            and torch.equal(s.nested_absmax, s_ref.state2.absmax)
            and torch.equal(s.offset, s_ref.offset)
        )
        t_bnb = best_of(
            lambda W=W: F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4"),
            args.repeats,
        )
        t_q = best_of(lambda W=W: quantize_4bit(W, 64, "nf4", True), args.repeats)
        t_dq_bnb = best_of(lambda p_ref=p_ref, s_ref=s_ref: F.dequantize_4bit(p_ref, s_ref), args.repeats)
        t_dq_q = best_of(lambda p=p, s=s: dequantize_4bit(p, s), args.repeats)
        same_values = torch.equal(
            reproduce_4bit(W).view(torch.int32), F.dequantize_4bit(p_ref, s_ref).float().view(torch.int32)
        )
        t_rt_bnb = best_of(
            lambda W=W: F.dequantize_4bit(*F.quantize_4bit(W, blocksize=64, compress_statistics=True)),
            args.repeats,
        )
        t_rt_q = best_of(lambda W=W: reproduce_4bit(W), args.repeats)
        n = W.numel()
        rows.append(
            {
                "layer": label,
                "shape": list(shape),
                "identical_bytes": identical,
                "quantize_mparam_s": {"qmerge": n / t_q / 1e6, "bitsandbytes": n / t_bnb / 1e6},
                "quantize_speedup": t_bnb / t_q,
                "dequantize_mparam_s": {"qmerge": n / t_dq_q / 1e6, "bitsandbytes": n / t_dq_bnb / 1e6},
                "reproduce_identical_values": same_values,
                "reproduce_mparam_s": {"qmerge": n / t_rt_q / 1e6, "bitsandbytes": n / t_rt_bnb / 1e6},
                "reproduce_speedup": t_rt_bnb / t_rt_q,
            }
        )
        total["qmerge"] += t_q
        total["bitsandbytes"] += t_bnb
        total["params"] += n
    out = {
        "threads": torch.get_num_threads(),
        "layers": rows,
        "quantize_speedup_total": total["bitsandbytes"] / total["qmerge"],
        "all_identical": all(r["identical_bytes"] and r["reproduce_identical_values"] for r in rows),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
