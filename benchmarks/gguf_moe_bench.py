"""GGUF export of a mixture-of-experts model: peak memory against the largest tensor the GGUF holds (one
projection's experts stacked), and against the route users take today (PEFT merge into a bf16 directory,
then llama.cpp's convert_hf_to_gguf.py), each step in a fresh process (wall time, peak RSS).

The synthetic model has Mixtral 8x7B's layer shape (8 experts of 14336 x 4096, GQA 32/8 heads, vocabulary
32000) with --layers layers, stored in bf16 with a small SentencePiece tokenizer; the adapter is a rank-16
LoRA on the attention projections. Pass llama.cpp's converter with --converter to measure the peer.

Usage: python benchmarks/gguf_moe_bench.py [--size 8x7b|tiny] [--layers N] [--converter PATH]
                                           [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_bench import add_sentencepiece, timed  # noqa: E402
from merge_bench import run_route  # noqa: E402

SHAPES = {
    "8x7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000, num_local_experts=8, num_experts_per_tok=2),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1000, num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(s: dict, layers: int) -> dict[str, tuple[int, ...]]:
    h, ff, kv = s["hidden_size"], s["intermediate_size"], s["hidden_size"] // s["num_attention_heads"]
    kv *= s["num_key_value_heads"]
    shapes = {
        "model.embed_tokens.weight": (s["vocab_size"], h),
        "lm_head.weight": (s["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h)}
        shapes |= {p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h)}
        shapes[p + "block_sparse_moe.gate.weight"] = (s["num_local_experts"], h)
        for e in range(s["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (ff, h), q + "w3.weight": (ff, h), q + "w2.weight": (h, ff)}
    return shapes


def build(work: Path, size: str, layers: int, rank: int = 16) -> tuple[Path, Path, int]:
    """The bf16 base and the attention adapter in work/; their paths and the parameter count."""
    from transformers import MixtralConfig

    from qmerge.io.safetensors import PlannedTensor, StreamingSafetensorsWriter

    s = SHAPES[size]
    base, adapter = work / "base-bf16", work / "adapter"
    base.mkdir(parents=True)
    MixtralConfig(**s, num_hidden_layers=layers, max_position_embeddings=4096, dtype="bfloat16",
                  architectures=["MixtralForCausalLM"]).save_pretrained(str(base))  # fmt: skip
    shapes = _shapes(s, layers)
    entries = [PlannedTensor(n, "BF16", shp) for n, shp in sorted(shapes.items())]
    w = StreamingSafetensorsWriter(base / "model.safetensors", entries, {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for e in entries:
        norm = e.name.endswith("norm.weight")
        w.write(
            e.name, (torch.ones(e.shape) if norm else torch.randn(e.shape, generator=g) * 0.02).bfloat16()
        )
    w.close()
    attention_adapter(adapter, base, [n for n in shapes if n.split(".")[-2] in ATTENTION], shapes, rank, g)
    add_sentencepiece(base)
    return base, adapter, sum(torch.Size(v).numel() for v in shapes.values())


def attention_adapter(adapter: Path, base: Path, names: list[str], shapes: dict, rank: int, g) -> None:
    """A rank-`rank` PEFT LoRA on the weights `names` (attention projections) of `base`, written to `adapter`."""
    from safetensors.torch import save_file

    lora = {}
    for name in names:
        shape, key = shapes[name], "base_model.model." + name.removesuffix(".weight")
        lora[key + ".lora_A.weight"] = torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
        lora[key + ".lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 1e-3
    adapter.mkdir()
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(ATTENTION),
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def timed_gguf_export(adapter: Path, base: Path, out: Path, gguf_type: str) -> dict:
    """`qmerge export ADAPTER --base BASE --to gguf` in a fresh process, inputs cold: timed()'s figures."""
    cmd = [
        "export",
        str(adapter),
        "--base",
        str(base),
        "--to",
        "gguf",
        "--gguf-type",
        gguf_type,
        "-o",
        str(out),
    ]
    return timed([adapter, base], "cold", "qmerge.cli", *cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8x7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--converter", type=Path, default=None, help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmerge-gguf-moe-bench-", dir=args.workdir))
    try:
        base, adapter, n = build(work, args.size, args.layers)
        s = SHAPES[args.size]
        stack = s["num_local_experts"] * s["intermediate_size"] * s["hidden_size"] * 2  # f16 bytes
        out = work / "qmerge.gguf"
        result: dict = {
            "size": args.size,
            "layers": args.layers,
            "parameters": n,
            "largest_stack_gib": stack / 2**30,
            "base_gib": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30,
            "qmerge_export_f16": timed_gguf_export(adapter, base, out, "f16"),
        }
        result["gguf_bytes"] = {"qmerge": out.stat().st_size}
        if args.converter:
            merged = work / "merged-bf16"
            step1 = run_route("peft16", adapter, base, work / "peft-out", "cold")  # timed; output removed
            timed([], "warm", "qmerge.cli", "merge", str(adapter), "--base", str(base), "-o", str(merged))
            theirs = work / "llamacpp.gguf"
            step2 = timed([merged], "cold", str(args.converter), str(merged), "--outtype", "f16",
                          "--outfile", str(theirs))  # fmt: skip
            result["peer"] = {"peft_merge_to_bf16": step1, "convert_hf_to_gguf_f16": step2}
            if theirs.exists():
                result["gguf_bytes"]["llama.cpp"] = theirs.stat().st_size
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
