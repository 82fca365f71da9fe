"""One layer's calibration at 7B shape: what each 4-bit grid costs and what its error feedback buys.

For a Llama-2-7B down_proj (4096 x 11008) and gate/up (11008 x 4096), with correlated random inputs
(TOKENS rows of a random mixing of Gaussian columns, so that GPTQ has correlations to use), this measures in
one process: the Hessian H = X^T X / n, its damped inverse, each grid's scale search (NF4's absmax is
bitsandbytes' and free; IQ4_XS, Q4_K, Q5_K, Q6_K search), the GPTQ codes, and as the peer llama.cpp's own
quantizer with the same importance matrix (ggml_quantize_chunk, what `llama-quantize --imatrix` runs).
Quality is the layer's output error on the calibration inputs, trace(D H D^T) with D = Q - W, relative to
plain rounding on the same grid; llama.cpp's is relative to the same rounding.

    python benchmarks/calibration_layer_bench.py [--tokens 4096] [--shapes down,gate] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

SHAPES = {"down": (4096, 11008), "gate": (11008, 4096)}


def out_err(D: torch.Tensor, H: torch.Tensor) -> float:
    step = max(1, D.shape[0] // 512)  # sampled rows, as the exports report it
    D = D[::step].float()
    return float(((D @ H) * D).sum(dtype=torch.float64))


def grid_of(name: str, W: torch.Tensor, imp: torch.Tensor):
    from qmerge.quant import ggml4, kquants

    if name != "IQ4_XS":
        return kquants.GRIDS[name](W, imp)
    d, steps = ggml4.superblock_scales(ggml4.block_scales(W, imp, "iq4_xs", fp16=False))
    return kquants.Grid(ggml4.VALUES["iq4_xs"], 32, ggml4.effective_scales(d, steps), None, None)


def one_grid(name: str, W: torch.Tensor, H) -> dict:
    import gguf

    from qmerge import llama_cpp
    from qmerge.quant.gptq import gptq_codes

    imp = torch.diag(H.H)
    t0 = time.perf_counter()
    grid = grid_of(name, W, imp)
    t1 = time.perf_counter()
    codes = gptq_codes(W, H, grid.values, grid.scale, grid.block, offset=grid.offset)
    t2 = time.perf_counter()
    qtype = gguf.GGMLQuantizationType[name]
    data = llama_cpp.quantize_rows(int(qtype), W.numpy(), imp.numpy())
    t3 = time.perf_counter()
    theirs = torch.from_numpy(gguf.quants.dequantize(data.reshape(W.shape[0], -1), qtype))
    rounding = out_err(grid.dequantize(grid.round(W)) - W, H.H)
    return {
        "scales_s": t1 - t0,
        "gptq_s": t2 - t1,
        "llama_cpp_imatrix_s": t3 - t2,
        "output_error_vs_rounding": out_err(grid.dequantize(codes) - W, H.H) / rounding,
        "llama_cpp_imatrix_error_vs_rounding": out_err(theirs - W, H.H) / rounding,
    }


def layer(shape: tuple[int, int], tokens: int, grids: list[str]) -> dict:
    from qmerge.quant.gptq import Hessian

    g = torch.Generator().manual_seed(0)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = torch.randn(tokens, in_f, generator=g) @ mix
    t0 = time.perf_counter()
    H = Hessian.of_inputs(X)
    t1 = time.perf_counter()
    del X, mix
    H.inverse(0.01)
    t2 = time.perf_counter()
    row = {"shape": list(shape), "hessian_s": t1 - t0, "inverse_s": t2 - t1, "grids": {}}
    print(shape, f"Hessian {t1 - t0:.1f} s, inverse {t2 - t1:.1f} s", flush=True)
    for name in grids:
        row["grids"][name] = one_grid(name, W, H)
        print(shape, name, json.dumps({k: round(v, 3) for k, v in row["grids"][name].items()}), flush=True)
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="down,gate")
    ap.add_argument("--grids", default="Q4_K,Q5_K,Q6_K,IQ4_XS")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [layer(SHAPES[s], args.tokens, args.grids.split(",")) for s in args.shapes.split(",")]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
