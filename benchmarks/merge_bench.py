"""Merge speed and peak memory: qmerge against the route users take with PEFT, in one run.

Builds a synthetic Llama-shaped model (default: TinyLlama's shape, 1.1B parameters) in bf16 and in
bitsandbytes 4-bit form, plus a rank-16 all-linear LoRA adapter with non-zero B, then runs each route in
a fresh process and records wall time and peak RSS (VmHWM of that process):

  qmerge (4-bit base)   qmerge merge ADAPTER --base BASE4 -o OUT
  qmerge (16-bit base)  qmerge merge ADAPTER --base BASE16 -o OUT  (NF4 reproduced from the 16-bit base)
  PEFT (16-bit base)    AutoModelForCausalLM.from_pretrained(BASE16) -> PeftModel -> merge_and_unload -> save_pretrained
  PEFT (4-bit base)     from_pretrained(BASE4) -> PeftModel -> merge_and_unload -> dequantize -> save_pretrained

Before each route its inputs are dropped from the page cache (--cache cold, the default: the base is on the
disk) or read into it (--cache warm).

Usage: python benchmarks/merge_bench.py [--size 1.1b|0.3b|7b|tiny] [--routes all|qmerge] [--cache cold|warm]
                                        [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-2-7B (the PEFT routes need more memory than a 24 GiB machine has: run with --routes qmerge)
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # TinyLlama-1.1B
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "0.3b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    h, i, head = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def build(work: Path, size: str, rank: int = 16) -> tuple[Path, Path, Path, int]:
    """bf16 base, 4-bit base and adapter in work/; returns their paths and the parameter count."""
    from transformers import LlamaConfig

    from qmerge.api import export
    from qmerge.io.safetensors import PlannedTensor, StreamingSafetensorsWriter

    s = SHAPES[size]
    base16, base4, adapter = work / "base-bf16", work / "base-nf4", work / "adapter"
    base16.mkdir(parents=True)
    LlamaConfig(
        **s,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(str(base16))
    shapes = {
        "model.embed_tokens.weight": (s["vocab_size"], s["hidden_size"]),
        "lm_head.weight": (s["vocab_size"], s["hidden_size"]),
        "model.norm.weight": (s["hidden_size"],),
    }
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (s["hidden_size"],)
        shapes[p + "post_attention_layernorm.weight"] = (s["hidden_size"],)
        for name, shp in _linear_shapes(s).items():
            shapes[p + name + ".weight"] = shp
    entries = [PlannedTensor(n, "BF16", shp) for n, shp in sorted(shapes.items())]
    w = StreamingSafetensorsWriter(base16 / "model.safetensors", entries, {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for e in entries:
        t = (
            torch.ones(e.shape)
            if e.name.endswith("norm.weight")
            else torch.randn(e.shape, generator=g) * 0.02
        )
        w.write(e.name, t.to(torch.bfloat16))
    w.close()
    export(base16, "nf4", base4)  # bitsandbytes' exact 4-bit form, as transformers saves it
    adapter.mkdir()
    lora = {}
    for layer in range(s["num_hidden_layers"]):
        for name, (out_f, in_f) in _linear_shapes(s).items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            lora[key + ".lora_A.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
            lora[key + ".lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 1e-3
    from safetensors.torch import save_file

    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": [n.split(".")[-1] for n in LINEARS],
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(base16),
                "use_rslora": False,
                "use_dora": False,
                "fan_in_fan_out": False,
            }
        )
    )
    n_params = sum(torch.Size(v).numel() for v in shapes.values())
    return base16, base4, adapter, n_params


CHILDREN = {
    "qmerge": "from qmerge.api import merge; merge(ADAPTER, OUT, base=BASE)",
    "peft16": (
        "import torch; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        "m = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.bfloat16)\n"
        "m = PeftModel.from_pretrained(m, str(ADAPTER)).merge_and_unload()\n"
        "m.save_pretrained(str(OUT))"
    ),
    "peft4": (
        "from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        "m = AutoModelForCausalLM.from_pretrained(str(BASE), device_map='cpu')\n"
        "m = PeftModel.from_pretrained(m, str(ADAPTER)).merge_and_unload().dequantize()\n"
        "m.save_pretrained(str(OUT))"
    ),
}


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork and exec,
    so a child would report its parent's peak whenever its own is lower."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(kind: str, adapter: str, base: str, out: str) -> None:
    """Run one route in this (fresh) process and print its time and peak RSS as JSON."""
    from pathlib import Path as P

    start = time.perf_counter()
    env = {"ADAPTER": P(adapter), "BASE": P(base), "OUT": P(out)}
    error = None
    try:
        exec(CHILDREN[kind], env)
    except Exception as e:  # noqa: BLE001 - a failing peer route is a result, not a crash
        error = f"{type(e).__name__}: {str(e)[:200]}"
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "max_rss_gib": peak_rss_gib(),
                "error": error,
            }
        )
    )


def settle(inputs: list[Path], cache: str) -> None:
    """Flush dirty pages (the build's, the last route's) so that no route pays for another's writes, then
    put the route's input files in the state `cache` names: "cold" drops them from the page cache (the
    base is on the disk, as after a download or a reboot), "warm" reads them into it (as right after
    training read them)."""
    os.sync()
    for d in inputs:
        for f in sorted(d.rglob("*")):
            if not f.is_file():
                continue
            if cache == "cold":
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            else:
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(64 * 2**20):
                        pass
    time.sleep(2)


def run_route(kind: str, adapter: Path, base: Path, out: Path, cache: str = "cold") -> dict:
    settle([adapter, base], cache)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(adapter), str(base), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout)[-400:], "wall_seconds": wall}
    res = json.loads(lines[-1])
    res["wall_seconds"] = wall
    res["output_bytes"] = sum(f.stat().st_size for f in out.rglob("*.safetensors")) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--routes", choices=["all", "qmerge"], default="all", help="qmerge: skip the PEFT routes")
    ap.add_argument(
        "--cache",
        choices=["cold", "warm"],
        default="cold",
        help="inputs dropped from the page cache before each route (cold), or read into it (warm)",
    )
    ap.add_argument("--child", nargs=4, metavar=("KIND", "ADAPTER", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="qmerge-bench-", dir=args.workdir))
    try:
        t = time.perf_counter()
        base16, base4, adapter, n = build(work, args.size)
        print(f"built {n / 1e9:.2f}B-parameter model in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        routes = {
            "qmerge (4-bit base)": ("qmerge", base4),
            "qmerge (16-bit base)": ("qmerge", base16),
            "PEFT merge_and_unload (16-bit base)": ("peft16", base16),
            "PEFT merge_and_unload + dequantize (4-bit base)": ("peft4", base4),
        }
        if args.routes == "qmerge":
            routes = {k: v for k, v in routes.items() if v[0] == "qmerge"}
        results = {}
        for label, (kind, base) in routes.items():
            results[label] = run_route(kind, adapter, base, work / "out", args.cache)
            print(label, json.dumps(results[label]), file=sys.stderr)
        peer = results.get("PEFT merge_and_unload (16-bit base)", {})
        summary = {
            "size": args.size,
            "parameters": n,
            "torch_threads": torch.get_num_threads(),
            "cache": args.cache,
            "routes": results,
        }
        if "seconds" in peer and "seconds" in results["qmerge (4-bit base)"]:
            q = results["qmerge (4-bit base)"]
            summary["speedup_vs_peft16"] = peer["wall_seconds"] / q["wall_seconds"]
            summary["rss_ratio_peft16_over_qmerge"] = peer["max_rss_gib"] / q["max_rss_gib"]
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
